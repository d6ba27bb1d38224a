package model

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nkeys"
)

// PurposeEnroll signs a device's enrollment request with its new key: the
// proof that the device holds the key it asks credentials for.
const PurposeEnroll = "fleet.enroll.v1"

// MaxSkew is how far a signed request's time may be from the coordinator's
// clock. Replays are refused within this window by a nonce cache and after
// it by the time check.
const MaxSkew = 2 * time.Minute

// Request is the payload of an admin API envelope (a Signed with
// PurposeAPI). The verb is signed too, so a request for one verb cannot be
// replayed against another.
type Request struct {
	Verb  string          `json:"verb"`
	Time  time.Time       `json:"time"`
	Nonce string          `json:"nonce"`
	Args  json.RawMessage `json:"args,omitempty"`
}

// Error codes of API and enrollment replies.
const (
	CodeBadRequest = "bad_request" // malformed input: fix the request
	CodeRefused    = "refused"     // signature, freshness, replay, role or token refused
	CodeNotFound   = "not_found"
	CodeConflict   = "conflict" // e.g. ambiguous device name
	CodeInternal   = "internal" // the coordinator failed: retry later
)

// Response is the reply to every admin API request.
type Response struct {
	Error string          `json:"error,omitempty"`
	Code  string          `json:"code,omitempty"`
	Data  json.RawMessage `json:"data,omitempty"`
}

// ParseEnvelope decodes a signed API request and checks its signature and
// shape. Freshness, replay and role are the coordinator's business.
func ParseEnvelope(b []byte) (*Signed, *Request, error) {
	var s Signed
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, nil, fmt.Errorf("request is not a signed JSON envelope: %w", err)
	}
	if err := s.Verify(PurposeAPI, nil); err != nil {
		return &s, nil, fmt.Errorf("request signature: %w", err)
	}
	var r Request
	if err := s.Decode(&r); err != nil {
		return &s, nil, err
	}
	if r.Verb == "" || r.Nonce == "" || len(r.Nonce) > 64 || r.Time.IsZero() {
		return &s, nil, errors.New("request lacks verb, nonce or time")
	}
	return &s, &r, nil
}

// Admin is a person or CI job in the fleet_admins bucket, keyed by Key.
type Admin struct {
	// Key is the admin's nkey user public key: it signs API requests.
	Key  string `json:"key"`
	Name string `json:"name"`
	// Role is viewer, operator or owner.
	Role string `json:"role"`
	// Groups, when set, limit an operator's device writes to these groups.
	Groups    []string  `json:"groups,omitempty"`
	CreatedAt time.Time `json:"created_at"`
}

// TokenInfo is what anyone may see of an enrollment token: never the
// secret nor its hash.
type TokenInfo struct {
	ID        string    `json:"id"`
	Groups    []string  `json:"groups"`
	Uses      int       `json:"uses"` // uses left
	Used      int       `json:"used"`
	ExpiresAt time.Time `json:"expires_at"`
	Approval  bool      `json:"approval,omitempty"`
	// Site is where the token's devices connect: a site's leaf node, or
	// the hub (empty).
	Site      string    `json:"site,omitempty"`
	Revoked   bool      `json:"revoked,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	CreatedBy string    `json:"created_by,omitempty"`
	// BearerKey is the public key of the token's enroll credential,
	// revoked with the token.
	BearerKey string `json:"bearer_key"`
}

// TokenCreate is the argument of the token-create verb.
type TokenCreate struct {
	Groups   []string      `json:"groups"`
	Uses     int           `json:"uses"`
	TTL      time.Duration `json:"ttl"`
	Approval bool          `json:"approval,omitempty"`
	Site     string        `json:"site,omitempty"`
}

// TokenCreated is the reply of token-create: the one time the token string
// is shown.
type TokenCreated struct {
	Token     string    `json:"token"`
	ID        string    `json:"id"`
	Groups    []string  `json:"groups"`
	Uses      int       `json:"uses"`
	ExpiresAt time.Time `json:"expires_at"`
	Approval  bool      `json:"approval,omitempty"`
	Site      string    `json:"site,omitempty"`
}

// DeviceRef names a device by full ID, unique ID prefix or unique name.
type DeviceRef struct {
	Ref string `json:"ref"`
}

// DeviceList is the argument of the devices verb (the reply is a
// PageOf[DeviceView], by name then ID).
type DeviceList struct {
	Group string `json:"group,omitempty"`
	Page  Page   `json:"page,omitzero"`
}

// DeviceGroups is the argument of device-groups.
type DeviceGroups struct {
	Ref    string   `json:"ref"`
	Groups []string `json:"groups"`
}

// DeviceView is a device record with its presence.
type DeviceView struct {
	Device
	Online   bool      `json:"online"`
	LastSeen time.Time `json:"last_seen,omitzero"`
	// Facts are the device's latest facts (devices show only).
	Facts *Facts `json:"facts,omitempty"`
}

// EnrollRequest is the payload of a device's enrollment request, signed
// with the device key it names (PurposeEnroll).
type EnrollRequest struct {
	TokenID  string    `json:"token_id"`
	Secret   string    `json:"secret"`
	XKey     string    `json:"xkey"`
	Hostname string    `json:"hostname"`
	Time     time.Time `json:"time"`
	Facts    *Facts    `json:"facts,omitempty"`
}

// EnrollResponse answers an enrollment request: the device's user JWT, or
// an error with its code (CodeRefused is final, CodeInternal may be retried).
type EnrollResponse struct {
	JWT    string       `json:"jwt,omitempty"`
	Status DeviceStatus `json:"status,omitempty"`
	Error  string       `json:"error,omitempty"`
	Code   string       `json:"code,omitempty"`
}

// ParseEnrollRequest decodes a signed enrollment request and checks the
// proof of possession: the signer is the device key being enrolled.
func ParseEnrollRequest(b []byte) (string, *EnrollRequest, error) {
	var s Signed
	if err := json.Unmarshal(b, &s); err != nil {
		return "", nil, fmt.Errorf("enrollment request is not a signed JSON envelope: %w", err)
	}
	if err := s.Verify(PurposeEnroll, nil); err != nil {
		return "", nil, fmt.Errorf("enrollment request signature: %w", err)
	}
	var r EnrollRequest
	if err := s.Decode(&r); err != nil {
		return "", nil, err
	}
	if r.Time.IsZero() || (r.TokenID == "") != (r.Secret == "") {
		return "", nil, errors.New("enrollment request lacks token id, secret or time")
	}
	if !nkeys.IsValidPublicCurveKey(r.XKey) {
		return "", nil, fmt.Errorf("xkey %q is not a curve public key", r.XKey)
	}
	if err := CheckHostname(r.Hostname); err != nil {
		return "", nil, err
	}
	return s.Signer, &r, nil
}

// CheckGroup reports whether g can be a group name: a word of letters,
// digits, - and _, usable in subjects and on command lines.
func CheckGroup(g string) error {
	if g == "" || len(g) > 64 || strings.IndexFunc(g, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_')
	}) >= 0 {
		return fmt.Errorf("%q is not a valid group name (letters, digits, - and _, at most 64)", g)
	}
	return nil
}

// AuditResult is the outcome of an audited request.
type AuditResult string

const (
	AuditOK      AuditResult = "ok"
	AuditError   AuditResult = "error"
	AuditRefused AuditResult = "refused"
)

// AuditRecord is one entry of the FLEET_AUDIT stream: the signed request
// verbatim, who sent it and what came of it.
type AuditRecord struct {
	Time   time.Time   `json:"time"`
	Verb   string      `json:"verb"`
	Signer string      `json:"signer,omitempty"`
	Admin  string      `json:"admin,omitempty"`
	Role   string      `json:"role,omitempty"`
	Result AuditResult `json:"result"`
	Error  string      `json:"error,omitempty"`
	// Request is the signed request verbatim, for requests that took
	// effect (so the trail can be verified); a refused one keeps only its
	// hash and size.
	Request      json.RawMessage `json:"request,omitempty"`
	RequestHash  string          `json:"request_sha256,omitempty"`
	RequestBytes int             `json:"request_bytes,omitempty"`
	// Prev is the AuditHash of the entry before this one ("" for the
	// first): the trail is a chain, so a lost or removed entry shows.
	Prev string `json:"prev,omitempty"`
}

// AuditHash is the hash of an audit entry as stored (its JSON encoding),
// which the next entry names as Prev.
func AuditHash(rec AuditRecord) string {
	b, _ := json.Marshal(rec)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// CheckAuditChain checks that each entry names the one before it. It
// returns the index of each entry whose predecessor is missing or altered.
// The first entry may name a predecessor: the size limit drops the oldest
// entries.
func CheckAuditChain(recs []AuditRecord) []int {
	var broken []int
	for i := 1; i < len(recs); i++ {
		if recs[i].Prev != AuditHash(recs[i-1]) {
			broken = append(broken, i)
		}
	}
	return broken
}

// TokenRef names a token by id.
type TokenRef struct {
	ID string `json:"id"`
}
