package agent

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"fleet/model"
)

func hdr(kv ...string) nats.Header {
	h := nats.Header{}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Set(kv[i], kv[i+1])
	}
	return h
}

func TestParseDesired(t *testing.T) {
	issued := time.Date(2026, 11, 22, 0, 0, 0, 5, time.UTC)
	d := model.Desired{Device: "U1", ReleaseID: "r1", RolloutID: "ro", StorePath: "/nix/store/x", IssuedAt: issued}
	body, _ := json.Marshal(d)

	m, err := ParseDesired(hdr("Status", "404", "Description", "Message Not Found"), nil)
	if err != nil || !m.Absent {
		t.Fatalf("404: %+v %v", m, err)
	}
	if _, err := ParseDesired(hdr("Status", "408"), nil); err == nil {
		t.Fatal("status 408 accepted")
	}
	for _, op := range []string{"DEL", "PURGE"} {
		m, err := ParseDesired(hdr(nats.JSSequence, "9", "KV-Operation", op), nil)
		if err != nil || !m.Absent || m.Seq != 9 {
			t.Fatalf("%s: %+v %v", op, m, err)
		}
	}
	if _, err := ParseDesired(hdr(nats.JSSequence, "x"), body); err == nil {
		t.Fatal("bad sequence accepted")
	}
	m, err = ParseDesired(hdr(nats.JSSequence, "7"), []byte("{nope"))
	if err != nil || m.Err == nil || m.Desired != nil || m.Key() != "seq:7" {
		t.Fatalf("garbage body: %+v %v", m, err)
	}
	m, err = ParseDesired(hdr(nats.JSSequence, "12"), body)
	if err != nil || m.Desired == nil || m.Seq != 12 || m.Key() != "ro|r1|/nix/store/x|"+strconv.FormatInt(issued.UnixNano(), 10) {
		t.Fatalf("valid: %+v %v", m, err)
	}
	m, err = ParseDesired(nats.Header{}, nil)
	if err != nil || !m.Absent {
		t.Fatalf("empty: %+v %v", m, err)
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
	a, err := New(Options{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if a.o.ReleaseSigners == nil {
		t.Fatal("nil signers would trust any signer")
	}
}
