package integration

import (
	"context"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"fleet/internal/dirstate"
)

// A data dir belongs to one running coordinator: a second one (other
// ports) is refused at once, names the first, and changes nothing in the
// dir; so is `init`. The first keeps serving.
func TestSecondCoordinatorOnBusyDataDir(t *testing.T) {
	w := newFleetWorld(t)
	w.mustAdmin("token", "create", "--group", "g", "--uses", "1", "--ttl", "1h")
	// The running coordinator writes its JetStream files; everything else
	// (keys, account JWTs, creds) must stay as it is.
	keep := func() dirstate.State {
		s, err := dirstate.Read(w.dataDir)
		if err != nil {
			t.Fatal(err)
		}
		for p := range s {
			if strings.HasPrefix(p, filepath.Join(w.dataDir, "jetstream")+"/") {
				delete(s, p)
			}
		}
		return s
	}
	before := keep()
	want := "is in use by pid " + strconv.Itoa(w.coord.Process.Pid)
	for _, args := range [][]string{
		{"run", "--data-dir", w.dataDir, "--listen", freeAddr(t), "--http", freeAddr(t)},
		{"run", "--data-dir", w.dataDir, "--listen", freeAddr(t), "--http", ""},
	} {
		ctx, cancel := context.WithTimeout(w.ctx, 20*time.Second)
		start := time.Now()
		out, err := exec.CommandContext(ctx, coordinatorBin, args...).CombinedOutput()
		cancel()
		if err == nil || !strings.Contains(string(out), want) || !strings.Contains(string(out), "--data-dir") {
			t.Fatalf("fleet-coordinator %s on a busy dir: %v\n%s", args[0], err, out)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("refusal took %s", d)
		}
	}
	if d := dirstate.Diff(before, keep()); len(d) > 0 {
		t.Fatalf("the refused starts changed the data dir: %v", d)
	}
	// The first one still serves, its state intact.
	if out := w.mustAdmin("token", "ls"); !strings.Contains(out, "g") {
		t.Fatalf("token ls after the refused starts: %s", out)
	}
}
