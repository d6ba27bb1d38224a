package model

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"
)

func seedKeys(t testing.TB) (nkeys.KeyPair, string) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	xk, _ := nkeys.CreateCurveKeys()
	xpub, _ := xk.PublicKey()
	return kp, xpub
}

func TestParseEnvelope(t *testing.T) {
	kp, _ := seedKeys(t)
	s, _ := Sign(kp, PurposeAPI, Request{Verb: "devices", Time: time.Now(), Nonce: "n1"})
	b, _ := json.Marshal(s)
	if _, r, err := ParseEnvelope(b); err != nil || r.Verb != "devices" {
		t.Fatalf("good envelope: %v", err)
	}
	// Signed for another purpose: refused.
	s2, _ := Sign(kp, PurposeEnroll, Request{Verb: "devices", Time: time.Now(), Nonce: "n1"})
	b2, _ := json.Marshal(s2)
	if _, _, err := ParseEnvelope(b2); err == nil {
		t.Fatal("enroll-purpose signature accepted as an API request")
	}
	s3, _ := Sign(kp, PurposeAPI, Request{Verb: "devices", Time: time.Now()})
	b3, _ := json.Marshal(s3)
	if _, _, err := ParseEnvelope(b3); err == nil || !strings.Contains(err.Error(), "nonce") {
		t.Fatalf("no nonce: %v", err)
	}
}

func FuzzParseEnvelope(f *testing.F) {
	kp, _ := seedKeys(f)
	s, _ := Sign(kp, PurposeAPI, Request{Verb: "devices", Time: time.Now(), Nonce: "n"})
	b, _ := json.Marshal(s)
	for _, seed := range []string{string(b), "", "{}", `{"payload":1}`, `{"payload":{},"signer":"U","sig":"x"}`, "null", "[]"} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		env, r, err := ParseEnvelope(data)
		if err != nil {
			return
		}
		if r == nil || env == nil || env.Verify(PurposeAPI, nil) != nil || r.Nonce == "" || r.Verb == "" {
			t.Fatalf("accepted an invalid envelope %q", data)
		}
	})
}

func FuzzParseEnrollRequest(f *testing.F) {
	kp, xk := seedKeys(f)
	s, _ := Sign(kp, PurposeEnroll, EnrollRequest{TokenID: "t", Secret: "s", XKey: xk, Hostname: "h", Time: time.Now()})
	b, _ := json.Marshal(s)
	for _, seed := range []string{string(b), "", "{}", `{"payload":"x"}`, "\xff"} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		key, r, err := ParseEnrollRequest(data)
		if err != nil {
			return
		}
		if !nkeys.IsValidPublicUserKey(key) || CheckHostname(r.Hostname) != nil || r.TokenID == "" {
			t.Fatalf("accepted an invalid request %q", data)
		}
	})
}

func FuzzParseToken(f *testing.F) {
	for _, seed := range []string{"", "fleet1.", "fleet1.a.b.c", "fleet1.a.b.eyJ0eXAiOiJKV1QifQ.e30.x", "fleet2.a.b.c", "fleet1..."} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseToken(s)
		if err != nil {
			return
		}
		if !ValidTokenID(p.ID) || !validTokenPart(p.Secret) || strings.Contains(p.ID+p.Secret, ".") {
			t.Fatalf("accepted %q as %+v", s, p)
		}
	})
}

func TestAuditChain(t *testing.T) {
	var recs []AuditRecord
	prev := ""
	for i := range 5 {
		r := AuditRecord{Time: time.Unix(int64(1000+i), 0).UTC(), Verb: "deploy", Result: AuditOK, Request: json.RawMessage(`{"n":` + string(rune('0'+i)) + `}`), Prev: prev}
		// As stored and read back.
		b, _ := json.Marshal(r)
		var back AuditRecord
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		recs = append(recs, back)
		prev = AuditHash(back)
	}
	if b := CheckAuditChain(recs); len(b) != 0 {
		t.Fatalf("intact chain reported broken at %v", b)
	}
	missing := append(append([]AuditRecord{}, recs[:2]...), recs[3:]...)
	if b := CheckAuditChain(missing); len(b) != 1 || b[0] != 2 {
		t.Fatalf("a removed entry: broken at %v, want [2]", b)
	}
	altered := append([]AuditRecord{}, recs...)
	altered[1].Verb = "admin-add"
	if b := CheckAuditChain(altered); len(b) != 1 || b[0] != 2 {
		t.Fatalf("an altered entry: broken at %v, want [2]", b)
	}
	// The oldest dropped by the size limit: the rest still holds.
	if b := CheckAuditChain(recs[2:]); len(b) != 0 {
		t.Fatalf("a truncated start: broken at %v", b)
	}
}
