package model

import (
	"encoding/json"
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

// TestCheckStatementJoinPinUndo: a device takes an older group deploy only
// with a newer admin statement that put it in that group (or unpinned it);
// a pin is a deploy of its release to its one device; an operator's undo
// is a way back like a revert-on-failure deploy.
func TestCheckStatementJoinPinUndo(t *testing.T) {
	admin := newTestUser(t)
	adminPub, _ := admin.PublicKey()
	rogue := newTestUser(t)
	dev := newTestUser(t)
	self, _ := dev.PublicKey()
	other := newTestUser(t)
	otherID, _ := other.PublicKey()
	trusted := []string{adminPub}
	t0 := time.Now().Add(-time.Hour)
	sign := func(kp nkeys.KeyPair, verb string, args any, at time.Time) *Signed {
		t.Helper()
		s, err := SignRequest(kp, verb, args, at)
		if err != nil {
			t.Fatal(err)
		}
		return &s
	}
	labDeploy := sign(admin, "deploy", DeployRequest{ReleaseID: "lab-1", Group: "lab"}, t0)
	devDeploy := sign(admin, "deploy", DeployRequest{ReleaseID: "dev-2", Group: "developers"}, t0.Add(10*time.Minute))
	// The device runs developers' dev-2, signed after lab's lab-1.
	last, err := CheckStatement(&Desired{ReleaseID: "dev-2", Deploy: devDeploy}, self, "host", trusted, Statement{})
	if err != nil {
		t.Fatal(err)
	}
	toLab := &Desired{ReleaseID: "lab-1", Deploy: labDeploy}
	if _, err := CheckStatement(toLab, self, "host", trusted, last); !errors.Is(err, ErrStaleDesired) {
		t.Fatalf("lab's older deploy without a join: %v", err)
	}
	moved := t0.Add(20 * time.Minute)
	for _, tc := range []struct {
		name string
		join *Signed
		want string
	}{
		{"move by a rogue key", sign(rogue, "device-groups", DeviceGroups{Ref: self, Groups: []string{"lab"}}, moved), "not trusted"},
		{"move of another device", sign(admin, "device-groups", DeviceGroups{Ref: otherID, Groups: []string{"lab"}}, moved), "not this one"},
		{"move into another group", sign(admin, "device-groups", DeviceGroups{Ref: self, Groups: []string{"qa"}}, moved), "not in \"lab\""},
		{"a pin of another release", sign(admin, "device-pin", DevicePin{Ref: self, ReleaseID: "dev-2"}, moved), "holds this device on"},
		{"not a membership statement", sign(admin, "token-create", map[string]any{"groups": []string{"lab"}}, moved), "not a device-groups"},
		{"a move older than what it runs", sign(admin, "device-groups", DeviceGroups{Ref: self, Groups: []string{"lab"}}, t0.Add(5*time.Minute)), "older than the last"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := *toLab
			d.Join = tc.join
			got, err := CheckStatement(&d, self, "host", trusted, last)
			if err == nil || !strings.Contains(err.Error(), tc.want) || got != last {
				t.Fatalf("got %+v, %v; want an error saying %q", got, err, tc.want)
			}
		})
	}
	// Moved into lab (by ID or host name), or unpinned: taken, dated by the
	// move.
	for _, join := range []*Signed{
		sign(admin, "device-groups", DeviceGroups{Ref: self, Groups: []string{"developers", "lab"}}, moved),
		sign(admin, "device-groups", DeviceGroups{Ref: "host", Groups: []string{"lab"}}, moved),
		sign(admin, "device-pin", DevicePin{Ref: self}, moved),
	} {
		d := *toLab
		d.Join = join
		st, err := CheckStatement(&d, self, "host", trusted, last)
		if err != nil || st.Release != "lab-1" || !st.Time.Equal(moved.UTC()) || st.Before != "dev-2" {
			t.Fatalf("join: %+v %v", st, err)
		}
	}

	// A pin is the deploy of its release to its device, and to no other.
	pin := sign(admin, "device-pin", DevicePin{Ref: self, ReleaseID: "lab-1"}, moved)
	pinned, err := CheckStatement(&Desired{ReleaseID: "lab-1", Deploy: pin}, self, "host", trusted, last)
	if err != nil || pinned.Release != "lab-1" {
		t.Fatalf("pin: %+v %v", pinned, err)
	}
	if _, err := CheckStatement(&Desired{ReleaseID: "lab-1", Deploy: pin}, otherID, "other", trusted, Statement{}); err == nil {
		t.Fatal("another device took a pin that names this one")
	}
	unpin := sign(admin, "device-pin", DevicePin{Ref: self}, moved)
	if _, err := CheckStatement(&Desired{ReleaseID: "lab-1", Deploy: unpin}, self, "host", trusted, Statement{}); err == nil || !strings.Contains(err.Error(), "unpins") {
		t.Fatalf("an unpin taken as a deploy: %v", err)
	}

	// Undo: back from dev-2 to what the device ran before it.
	first, _ := CheckStatement(&Desired{ReleaseID: "lab-1", Deploy: labDeploy}, self, "host", trusted, Statement{})
	onDev, _ := CheckStatement(&Desired{ReleaseID: "dev-2", Deploy: devDeploy}, self, "host", trusted, first)
	undoAt := t0.Add(30 * time.Minute)
	back := &Desired{ReleaseID: "lab-1", Deploy: labDeploy}
	for _, tc := range []struct {
		name string
		undo *Signed
		want string
	}{
		{"a pause", sign(admin, "rollout-action", RolloutRef{ID: "r1", Action: "pause", ReleaseID: "dev-2"}, undoAt), "does not revert"},
		{"an abort without revert", sign(admin, "rollout-action", RolloutRef{ID: "r1", Action: "abort", ReleaseID: "dev-2"}, undoAt), "does not revert"},
		{"an undo of another release", sign(admin, "rollout-action", RolloutRef{ID: "r1", Action: "undo", ReleaseID: "lab-1"}, undoAt), "revert: undoes"},
		{"an undo by a rogue key", sign(rogue, "rollout-action", RolloutRef{ID: "r1", Action: "undo", ReleaseID: "dev-2"}, undoAt), "not trusted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := *back
			d.Revert = tc.undo
			if _, err := CheckStatement(&d, self, "host", trusted, onDev); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error saying %q", err, tc.want)
			}
		})
	}
	for _, undo := range []*Signed{
		sign(admin, "rollout-action", RolloutRef{ID: "r1", Action: "undo", ReleaseID: "dev-2"}, undoAt),
		sign(admin, "rollout-action", RolloutRef{ID: "r1", Action: "abort", Revert: true, ReleaseID: "dev-2"}, undoAt),
	} {
		d := *back
		d.Revert = undo
		if st, err := CheckStatement(&d, self, "host", trusted, onDev); err != nil || st.Release != "lab-1" {
			t.Fatalf("undo: %+v %v", st, err)
		}
	}
}

// FuzzCheckStatement feeds desired states to the agent's statement check:
// it never panics, a refusal keeps the last statement, and what it takes
// names the release it carries and is dated no earlier than the last
// statement (a way back too carries a newer one).
func FuzzCheckStatement(f *testing.F) {
	admin, _ := nkeys.CreateUser()
	adminPub, _ := admin.PublicKey()
	dev, _ := nkeys.CreateUser()
	self, _ := dev.PublicKey()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	sign := func(verb string, args any, at time.Time) *Signed {
		s, err := SignRequest(admin, verb, args, at)
		if err != nil {
			f.Fatal(err)
		}
		return &s
	}
	last := Statement{Time: t0.Add(time.Hour), Release: "r2", Before: "r1"}
	for _, d := range []Desired{
		{ReleaseID: "r3", Deploy: sign("deploy", DeployRequest{ReleaseID: "r3", Group: "g"}, t0.Add(2*time.Hour))},
		{ReleaseID: "r0", Deploy: sign("deploy", DeployRequest{ReleaseID: "r0", Group: "g"}, t0),
			Join: sign("device-groups", DeviceGroups{Ref: self, Groups: []string{"g"}}, t0.Add(2*time.Hour))},
		{ReleaseID: "r1", Deploy: sign("deploy", DeployRequest{ReleaseID: "r1"}, t0),
			Revert: sign("rollout-action", RolloutRef{ID: "x", Action: "undo", ReleaseID: "r2"}, t0.Add(2*time.Hour))},
		{ReleaseID: "r4", Deploy: sign("device-pin", DevicePin{Ref: self, ReleaseID: "r4"}, t0.Add(3*time.Hour))},
	} {
		b, _ := json.Marshal(d)
		f.Add(b)
	}
	f.Add([]byte(`{"release_id":"r9","deploy":{"payload":"e30","signer":"x","sig":"y"}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var d Desired
		if json.Unmarshal(b, &d) != nil {
			return
		}
		next, err := CheckStatement(&d, self, "host", []string{adminPub}, last)
		if err != nil {
			if next != last {
				t.Fatalf("a refusal changed the statement: %+v", next)
			}
			return
		}
		if next.Release != d.ReleaseID {
			t.Fatalf("took %q but remembers %q", d.ReleaseID, next.Release)
		}
		if next.Time.Before(last.Time) {
			t.Fatalf("took a statement older than the last: %+v", next)
		}
	})
}
