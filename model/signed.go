// Package model holds the documents that fleet's binaries exchange: signed
// release manifests, each device's desired state, device records, facts and
// events. They travel as JSON over NATS and sit in JetStream.
package model

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"github.com/nats-io/nkeys"

	"fleet/subjects"
)

// Signature purposes. A signature covers its purpose too, so a signed API
// request can never pass as a signed release, or the reverse.
const (
	PurposeRelease = "fleet.release.v1"
	PurposeCommand = "fleet.command.v1"
	PurposeAPI     = "fleet.api.v1"
)

// Signed is a JSON document signed with an nkey (ed25519). The signature
// covers the purpose and the exact payload bytes, which travel verbatim, so
// verification never depends on re-encoding JSON the same way.
type Signed struct {
	Payload json.RawMessage `json:"payload"`
	Signer  string          `json:"signer"`
	Sig     string          `json:"sig"`
}

// Errors of Verify, for callers that branch on them.
var (
	ErrUnsigned      = errors.New("not signed")
	ErrBadSignature  = errors.New("signature does not match the payload")
	ErrUnknownSigner = errors.New("signer is not trusted")
)

func signingInput(purpose string, payload []byte) []byte {
	b := make([]byte, 0, len(purpose)+1+len(payload))
	b = append(b, purpose...)
	b = append(b, '\n')
	return append(b, payload...)
}

// Sign encodes v as compact JSON and signs it for purpose with kp, which
// must be a user key (admins and devices are nkey users).
func Sign(kp nkeys.KeyPair, purpose string, v any) (Signed, error) {
	payload, err := json.Marshal(v)
	if err != nil {
		return Signed{}, fmt.Errorf("encode payload: %w", err)
	}
	return SignBytes(kp, purpose, payload)
}

// SignBytes signs payload (JSON) for purpose with kp.
func SignBytes(kp nkeys.KeyPair, purpose string, payload []byte) (Signed, error) {
	var buf bytes.Buffer
	if err := json.Compact(&buf, payload); err != nil {
		return Signed{}, fmt.Errorf("payload is not JSON: %w", err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return Signed{}, err
	}
	if !nkeys.IsValidPublicUserKey(pub) {
		return Signed{}, fmt.Errorf("signing key %s is not a user key", pub)
	}
	sig, err := kp.Sign(signingInput(purpose, buf.Bytes()))
	if err != nil {
		return Signed{}, fmt.Errorf("sign: %w", err)
	}
	return Signed{Payload: buf.Bytes(), Signer: pub, Sig: base64.RawURLEncoding.EncodeToString(sig)}, nil
}

// Verify checks the signature for purpose. When trusted is not nil the
// signer must be one of its keys.
func (s *Signed) Verify(purpose string, trusted []string) error {
	if s == nil || len(s.Payload) == 0 || s.Sig == "" || s.Signer == "" {
		return ErrUnsigned
	}
	// Only the canonical 56-character form: nkeys also decodes a key with
	// trailing characters, which would give one key several names.
	if !subjects.ValidDeviceID(s.Signer) {
		return fmt.Errorf("signer %q is not an nkey user public key", s.Signer)
	}
	sig, err := base64.RawURLEncoding.DecodeString(s.Sig)
	if err != nil || len(sig) != ed25519.SignatureSize {
		return fmt.Errorf("%w: malformed signature", ErrBadSignature)
	}
	pk, err := nkeys.FromPublicKey(s.Signer)
	if err != nil {
		return fmt.Errorf("signer %q: %w", s.Signer, err)
	}
	// Signing compacts the payload; compacting again undoes any
	// pretty-printing the document met on its way.
	var payload bytes.Buffer
	if err := json.Compact(&payload, s.Payload); err != nil {
		return fmt.Errorf("%w: payload is not JSON", ErrBadSignature)
	}
	if err := pk.Verify(signingInput(purpose, payload.Bytes()), sig); err != nil {
		return ErrBadSignature
	}
	if trusted != nil && !slices.Contains(trusted, s.Signer) {
		return fmt.Errorf("%w: %s", ErrUnknownSigner, s.Signer)
	}
	return nil
}

// Decode unmarshals the payload into v. Fields this version does not know
// are ignored (they are signed too, so nothing unsigned slips in, and older
// agents keep accepting manifests from newer admins).
func (s *Signed) Decode(v any) error {
	dec := json.NewDecoder(bytes.NewReader(s.Payload))
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decode signed payload: %w", err)
	}
	if dec.More() {
		return errors.New("decode signed payload: trailing data")
	}
	return nil
}
