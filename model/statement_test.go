package model

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"
)

func TestCheckStatement(t *testing.T) {
	admin := newTestUser(t)
	adminPub, _ := admin.PublicKey()
	rogue := newTestUser(t)
	dev := newTestUser(t)
	self, _ := dev.PublicKey()
	trusted := []string{adminPub}
	t0 := time.Now().Add(-time.Hour)
	deploy := func(kp nkeys.KeyPair, rel string, at time.Time, devices []string, onFailure string) *Signed {
		t.Helper()
		if kp == nil {
			kp = admin
		}
		s, err := SignRequest(kp, "deploy", DeployRequest{ReleaseID: rel, Devices: devices, OnFailure: onFailure}, at)
		if err != nil {
			t.Fatal(err)
		}
		return &s
	}
	des := func(rel string, dep, rev *Signed) *Desired {
		return &Desired{Device: self, ReleaseID: rel, Deploy: dep, Revert: rev}
	}

	// A first deploy is taken and remembered.
	st, err := CheckStatement(des("r1", deploy(nil, "r1", t0, nil, ""), nil), self, "host", trusted, Statement{})
	if err != nil || st.Release != "r1" || st.Time.IsZero() {
		t.Fatalf("first deploy: %+v %v", st, err)
	}
	t1 := t0.Add(10 * time.Minute)
	st2, err := CheckStatement(des("r2", deploy(nil, "r2", t1, []string{"host"}, "revert"), nil), self, "host", trusted, st)
	if err != nil || st2.Release != "r2" || st2.Before != "r1" {
		t.Fatalf("second deploy: %+v %v", st2, err)
	}

	for _, tc := range []struct {
		name string
		d    *Desired
		want string
	}{
		{"no statement", des("r3", nil, nil), "no deploy signed"},
		{"untrusted signer", des("r3", deploy(rogue, "r3", t1.Add(time.Minute), nil, ""), nil), "not trusted"},
		{"another release", des("r3", deploy(nil, "r9", t1.Add(time.Minute), nil, ""), nil), "names release"},
		{"another device", des("r3", deploy(nil, "r3", t1.Add(time.Minute), []string{"other-host"}, ""), nil), "not this one"},
		{"replayed older deploy", des("r1", deploy(nil, "r1", t0, nil, ""), nil), "older than the last"},
		{"revert without a revert deploy", des("r1", deploy(nil, "r1", t0, nil, ""), deploy(nil, "r2", t1, nil, "")), "does not ask to revert"},
		{"revert to another release", des("r0", deploy(nil, "r0", t0.Add(-time.Hour), nil, ""), deploy(nil, "r2", t1, nil, "revert")), "revert: undoes"},
		{"revert by an untrusted key", des("r1", deploy(nil, "r1", t0, nil, ""), deploy(rogue, "r2", t1, nil, "revert")), "not trusted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := CheckStatement(tc.d, self, "host", trusted, st2)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error saying %q", err, tc.want)
			}
			if got != st2 {
				t.Fatalf("a refusal changed the statement: %+v", got)
			}
		})
	}
	if _, err := CheckStatement(des("r1", deploy(nil, "r1", t0, nil, ""), nil), self, "host", trusted, st2); !errors.Is(err, ErrStaleDesired) {
		t.Fatalf("stale: %v", err)
	}

	// The signed way back: r2's deploy asked to revert on failure, and the
	// device returns to r1, what it ran before.
	back, err := CheckStatement(des("r1", deploy(nil, "r1", t0, nil, ""), deploy(nil, "r2", t1, nil, "revert")), self, "host", trusted, st2)
	if err != nil || back.Release != "r1" {
		t.Fatalf("signed revert: %+v %v", back, err)
	}
	// Once back, the same revert cannot be replayed to go further back.
	if _, err := CheckStatement(des("r0", deploy(nil, "r0", t0.Add(-2*time.Hour), nil, ""), deploy(nil, "r2", t1, nil, "revert")), self, "host", trusted, back); err == nil {
		t.Fatal("a replayed revert went further back")
	}
}
