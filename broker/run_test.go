package broker

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"fleet/accounts"
	"fleet/internal/lockedbuf"
)

// TestMainRunUntilSignal runs `fleet-coordinator run` through the CLI on a
// fresh dir and stops it with SIGTERM, as systemd does.
func TestMainRunUntilSignal(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	out, errOut := &lockedbuf.Buffer{}, &lockedbuf.Buffer{}
	done := make(chan int, 1)
	go func() {
		done <- run([]string{"run", "--data-dir", dir, "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
			"--log-format", "json"}, out, errOut)
	}()
	// The next steps are printed once the coordinator serves, after the
	// signal handler is in place.
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(out.String(), "Next steps") {
		select {
		case code := <-done:
			t.Fatalf("run exited with %d before it was ready:\n%s\n%s", code, out, errOut)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("run not ready within 30s:\n%s\n%s", out, errOut)
		}
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("run exited with %d after SIGTERM:\n%s", code, errOut)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("run did not stop within 15s of SIGTERM")
	}
	o := out.String()
	for _, want := range []string{"Initialised fleet in " + dir, filepath.Join(dir, accounts.AdminCredsFile), "FLEET_SERVER=nats://127.0.0.1:", "/readyz"} {
		if !strings.Contains(o, want) {
			t.Errorf("output lacks %q:\n%s", want, o)
		}
	}
	if regexp.MustCompile(`127\.0\.0\.1:0\b`).MatchString(o + errOut.String()) {
		t.Errorf("output shows port 0 instead of the real port:\n%s", o)
	}
	if e := errOut.String(); !strings.Contains(e, `"coordinator ready"`) || !strings.Contains(e, `"coordinator stopped"`) {
		t.Errorf("log lacks ready/stopped lines:\n%s", e)
	}
	if !accounts.Initialized(dir) {
		t.Error("run did not initialise the dir")
	}
}

// TestInitFrom: `init --from` copies a fleet's identity for another
// coordinator of a cluster, without the operator seed or JetStream data,
// and refuses a dir that holds any of it.
func TestInitFrom(t *testing.T) {
	a, b := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	var out, errOut lockedbuf.Buffer
	if code := run([]string{"init", "--data-dir", a}, &out, &errOut); code != 0 {
		t.Fatalf("init: %d %s", code, errOut.String())
	}
	if code := run([]string{"init", "--data-dir", b, "--from", a}, &out, &errOut); code != 0 {
		t.Fatalf("init --from: %d %s", code, errOut.String())
	}
	ka, err := accounts.Load(a, "fleet", accounts.DefaultLimits)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := accounts.Load(b, "fleet", accounts.DefaultLimits)
	if err != nil {
		t.Fatal(err)
	}
	if ka.OperatorPublicKey() != kb.OperatorPublicKey() || ka.FleetAccount() != kb.FleetAccount() {
		t.Error("copied identity differs")
	}
	if _, err := os.Stat(filepath.Join(b, accounts.OperatorSeedFile)); err == nil {
		t.Error("the operator seed was copied")
	}
	errOut = lockedbuf.Buffer{}
	if code := run([]string{"init", "--data-dir", b, "--from", a}, &out, &errOut); code == 0 || !strings.Contains(errOut.String(), "already") {
		t.Errorf("second init --from: %d %s", code, errOut.String())
	}
}
