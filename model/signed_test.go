package model

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"
)

func TestSignedSurvivesReformattingNotTampering(t *testing.T) {
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	rel := Release{ID: "r1", CreatedAt: time.Now().UTC(), Author: pub, Default: "/nix/store/" + strings.Repeat("a", 32) + "-sys", Description: "web <&> db"}
	s, err := Sign(kp, PurposeRelease, rel)
	if err != nil {
		t.Fatal(err)
	}
	// Pretty-printed on its way (fleet-admin --json, jq): still valid.
	pretty, _ := json.MarshalIndent(struct{ S Signed }{s}, "", "    ")
	var back struct{ S Signed }
	if err := json.Unmarshal(pretty, &back); err != nil {
		t.Fatal(err)
	}
	if _, err := VerifyRelease(&back.S, []string{pub}); err != nil {
		t.Fatalf("reformatted manifest: %v", err)
	}
	// Another purpose, another signer list, or a changed byte: refused.
	if err := back.S.Verify(PurposeAPI, nil); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("signature valid for another purpose: %v", err)
	}
	other, _ := nkeys.CreateUser()
	opub, _ := other.PublicKey()
	if _, err := VerifyRelease(&back.S, []string{opub}); !errors.Is(err, ErrUnknownSigner) {
		t.Fatalf("unknown signer accepted: %v", err)
	}
	tampered := back.S
	tampered.Payload = json.RawMessage(strings.Replace(string(tampered.Payload), `"r1"`, `"r2"`, 1))
	if _, err := VerifyRelease(&tampered, nil); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("tampered manifest: %v", err)
	}
	// A manifest whose author is not its signer is refused.
	rel.Author = opub
	s2, _ := Sign(kp, PurposeRelease, rel)
	if _, err := VerifyRelease(&s2, nil); err == nil || !strings.Contains(err.Error(), "did not sign") {
		t.Fatalf("author mismatch: %v", err)
	}
}

func FuzzVerifySigned(f *testing.F) {
	kp, _ := nkeys.CreateUser()
	s, _ := Sign(kp, PurposeRelease, map[string]string{"id": "x"})
	b, _ := json.Marshal(s)
	f.Add(b)
	f.Add([]byte(`{"payload":{},"signer":"UA","sig":"x"}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var s Signed
		if json.Unmarshal(data, &s) != nil {
			return
		}
		_ = s.Verify(PurposeRelease, nil)
		_, _ = VerifyRelease(&s, nil)
	})
}
