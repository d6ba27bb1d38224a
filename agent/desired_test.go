package agent

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"fleet/model"
)

// reply encodes the coordinator's answer to a desired-state request.
func reply(t *testing.T, r model.DesiredReply) []byte {
	t.Helper()
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseDesired(t *testing.T) {
	issued := time.Date(2026, 11, 22, 0, 0, 0, 5, time.UTC)
	d := model.Desired{Device: "U1", ReleaseID: "r1", RolloutID: "ro", StorePath: "/nix/store/x", IssuedAt: issued}
	body, _ := json.Marshal(d)

	// A valid value: its revision and the decoded Desired.
	m, err := ParseDesired(reply(t, model.DesiredReply{Seq: 12, Desired: body}))
	if err != nil || m.Absent || m.Err != nil || m.Desired == nil || m.Seq != 12 ||
		m.Desired.ReleaseID != "r1" || !m.Desired.IssuedAt.Equal(issued) ||
		m.Key() != "ro|r1|/nix/store/x|"+strconv.FormatInt(issued.UnixNano(), 10) {
		t.Fatalf("valid: %+v %v", m, err)
	}

	// No value (never set, deleted or purged): absent, with the revision
	// when the coordinator gives one.
	for _, tc := range []struct {
		name string
		data []byte
		seq  uint64
	}{
		{"empty object", []byte(`{}`), 0},
		{"seq only", reply(t, model.DesiredReply{Seq: 9}), 9},
	} {
		m, err := ParseDesired(tc.data)
		if err != nil || !m.Absent || m.Desired != nil || m.Err != nil || m.Seq != tc.seq {
			t.Fatalf("%s: %+v %v", tc.name, m, err)
		}
	}

	// The coordinator's error is an error (retried), not a desired state.
	m, err = ParseDesired(reply(t, model.DesiredReply{Seq: 4, Desired: body, Error: "kv unavailable"}))
	if err == nil || !strings.Contains(err.Error(), "kv unavailable") || m.Absent || m.Desired != nil {
		t.Fatalf("coordinator error: %+v %v", m, err)
	}

	// A value that is not a Desired is returned with Err set, keyed by its
	// revision, so it is reported once.
	for _, bad := range []string{`{"seq":7,"desired":"nope"}`, `{"seq":7,"desired":[1,2]}`, `{"seq":7,"desired":{"issued_at":"yesterday"}}`} {
		m, err = ParseDesired([]byte(bad))
		if err != nil || m.Err == nil || m.Desired != nil || m.Absent || m.Seq != 7 || m.Key() != "seq:7" {
			t.Fatalf("undecodable desired %s: %+v %v", bad, m, err)
		}
	}

	// An envelope that is not the reply's JSON is an error.
	for _, bad := range []string{"", "{nope", "null x", `[]`, `{"seq":"7"}`, `{"error":5}`} {
		if m, err := ParseDesired([]byte(bad)); err == nil {
			t.Fatalf("bad envelope %q accepted: %+v", bad, m)
		}
	}
}

func TestStateRoundTripAndDamage(t *testing.T) {
	dir := t.TempDir()
	st, err := LoadState(dir)
	if err != nil || st.Phase != PhaseNone {
		t.Fatalf("missing state: %+v %v", st, err)
	}
	want := &ApplyState{Phase: PhaseSwitching, Attempt: "a1", StorePath: "/nix/store/x", Prev: Generation{Number: 3, System: "/nix/store/y"}}
	if err := SaveState(dir, want); err != nil {
		t.Fatal(err)
	}
	got, err := LoadState(dir)
	if err != nil || got.Phase != want.Phase || got.Prev != want.Prev {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	if err := os.WriteFile(filepath.Join(dir, StateFile), []byte("{half"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadState(dir); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("damaged state: %v", err)
	}
	// No temp files are left behind.
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("state dir holds %d entries", len(entries))
	}
}

func TestResolveRefusesBeforeFetch(t *testing.T) {
	// Desired.Resolve with no signers must refuse: the agent passes a
	// non-nil empty list when --release-signer is not set.
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	a, err := New(Options{StateDir: t.TempDir(), Key: kp})
	if err != nil {
		t.Fatal(err)
	}
	if a.o.ReleaseSigners == nil {
		t.Fatal("nil signers would trust any signer")
	}
	// A properly signed release: trusted when its signer is listed, refused
	// with the agent's (empty) list.
	admin, _ := nkeys.CreateUser()
	adminPub, _ := admin.PublicKey()
	path := "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-host"
	rel := model.Release{ID: "r1", CreatedAt: time.Now().UTC(), Author: adminPub, Default: path}
	signed, err := model.Sign(admin, model.PurposeRelease, rel)
	if err != nil {
		t.Fatal(err)
	}
	d := &model.Desired{ReleaseID: "r1", StorePath: path, Release: signed}
	if _, p, err := d.Resolve("host", []string{adminPub}); err != nil || p != path {
		t.Fatalf("trusted signer: %q %v", p, err)
	}
	if _, _, err := d.Resolve("host", a.o.ReleaseSigners); !errors.Is(err, model.ErrUnknownSigner) {
		t.Fatalf("no trusted signers: %v", err)
	}
}

// Facts and events are signed with the device key: an agent without one
// is refused, not started to send reports the coordinator rejects.
func TestNewRequiresKey(t *testing.T) {
	if _, err := New(Options{StateDir: t.TempDir()}); err == nil {
		t.Fatal("agent created without a device key")
	}
}
