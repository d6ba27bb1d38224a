package model

import (
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/jwt/v2"

	"fleet/subjects"
)

// TokenPrefix starts every enrollment token, so a token is recognisable in
// a file or a log and its format can change later (fleet2...).
const TokenPrefix = "fleet1"

// FormatToken renders an enrollment token: prefix, token id, secret and the
// bearer JWT of the enroll role that lets a brand-new device connect at all,
// as one string that fits in a file. id and secret never contain dots; the
// JWT does, so it comes last.
func FormatToken(id, secret, bearer string) string {
	return TokenPrefix + "." + id + "." + secret + "." + bearer
}

// ParsedToken is an enrollment token taken apart.
type ParsedToken struct {
	ID, Secret, JWT string
	// BearerKey is the enroll credential's public key, and Site its site:
	// together they name its inbox prefix.
	BearerKey, Site string
}

// InboxPrefix is the inbox prefix the token's enroll credential may receive
// replies under.
func (t *ParsedToken) InboxPrefix() string {
	return subjects.DeviceInboxPrefix(t.Site, t.BearerKey)
}

// ParseToken takes an enrollment token apart and checks its shape. It does
// not decide whether the coordinator will accept it.
func ParseToken(s string) (*ParsedToken, error) {
	s = strings.TrimSpace(s)
	parts := strings.SplitN(s, ".", 4)
	if len(parts) != 4 || parts[0] != TokenPrefix {
		return nil, errors.New("not a fleet enrollment token (it starts with " + TokenPrefix + "., from `fleet-admin token create`)")
	}
	t := &ParsedToken{ID: parts[1], Secret: parts[2], JWT: parts[3]}
	if !validTokenPart(t.ID) || !validTokenPart(t.Secret) {
		return nil, errors.New("enrollment token is damaged (bad id or secret); copy it again from `fleet-admin token create`")
	}
	uc, err := jwt.DecodeUserClaims(t.JWT)
	if err != nil {
		return nil, fmt.Errorf("enrollment token is damaged (its credential does not decode: %v); copy it again", err)
	}
	if !uc.BearerToken && uc.IssuerAccount == "" {
		return nil, errors.New("enrollment token is damaged: its credential is not an enroll credential")
	}
	t.BearerKey = uc.Subject
	t.Site = subjects.DefaultSite
	for _, tag := range uc.Tags {
		if v, ok := strings.CutPrefix(tag, "site:"); ok && subjects.ValidSite(v) {
			t.Site = v
		}
	}
	return t, nil
}

// validTokenPart: base64url or hex, one subject-safe KV key, not too long.
func validTokenPart(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

// ValidTokenID reports whether id can name a token (a KV key).
func ValidTokenID(id string) bool { return validTokenPart(id) }
