package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"fleet/accounts"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// natsCLI builds the real `nats` command (natscli, pinned in
// tools/natscli) once.
var natsCLI = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "fleet-natscli")
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", filepath.Join(dir, "nats"), "github.com/nats-io/natscli/nats")
	cmd.Dir = filepath.Join("..", "tools", "natscli")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build natscli: %v\n%s", err, out)
	}
	return filepath.Join(dir, "nats"), nil
})

// exitCodeOf is a finished command's exit code (-1 when it did not exit).
func exitCodeOf(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err == nil {
		return 0
	}
	return -1
}

// fleet-admin context save writes a context the real nats command uses as
// it is: it connects with the admin's creds, and replies reach the admin's
// inbox prefix (admins may subscribe only _INBOX_<key>.>).
func TestNATSContextWithNatsCLI(t *testing.T) {
	nats, err := natsCLI()
	if err != nil {
		t.Fatal(err)
	}
	w := newFleetWorld(t)
	cfg := t.TempDir()
	env := append(os.Environ(), "XDG_CONFIG_HOME="+cfg)
	save := exec.CommandContext(w.ctx, adminBin, "--server", "nats://"+w.listen, "--creds", w.creds, "context", "save", "fleet-test")
	save.Env = env
	if out, err := save.CombinedOutput(); err != nil {
		t.Fatalf("context save: %v\n%s", err, out)
	}
	natsRun := func(args ...string) (string, error) {
		cmd := exec.CommandContext(w.ctx, nats, append([]string{"--context", "fleet-test"}, args...)...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := natsRun("rtt"); err != nil || !strings.Contains(out, w.listen) {
		t.Fatalf("nats rtt: %v\n%s", err, out)
	}
	// A signed admin request through nats request: the coordinator's reply
	// comes back into the context's inbox prefix.
	cr, err := accounts.ReadCreds(w.creds)
	if err != nil {
		t.Fatal(err)
	}
	signed, err := model.SignRequest(cr.Key, subjects.VerbAdmins, model.ListQuery{}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(signed)
	out, err := natsRun("request", subjects.APIReadVerb(subjects.VerbAdmins), string(body), "--raw", "--timeout", "10s")
	if err != nil {
		t.Fatalf("nats request: %v\n%s", err, out)
	}
	var resp model.Response
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &resp); err != nil || resp.Error != "" || !strings.Contains(string(resp.Data), cr.PublicKey()) {
		t.Fatalf("reply through nats request: %v %q", err, out)
	}
	// And fleet-admin itself, with nothing but NATS_CONTEXT.
	ls := exec.CommandContext(w.ctx, adminBin, "--json", "admin", "ls")
	ls.Env = append(env, "NATS_CONTEXT=fleet-test")
	if out, err := ls.CombinedOutput(); err != nil || !strings.Contains(string(out), cr.PublicKey()) {
		t.Fatalf("fleet-admin with NATS_CONTEXT: %v\n%s", err, out)
	}
}

// The real binary: exit 2 for usage, 5 for an unreachable coordinator;
// SIGINT during deploy --wait says the rollout continues and exits 130; a
// coordinator killed during rollout watch ends it within seconds with 5.
func TestAdminBinaryExitCodes(t *testing.T) {
	w := newFleetWorld(t)
	w.addDevices(1, "web", fakePath("gen1"))
	w.release("rel-2", fakePath("gen2"))

	if _, errs, err := w.admin("devices", "ls", "--bogus"); exitCodeOf(err) != 2 || !strings.Contains(errs, "--bogus") {
		t.Errorf("usage: %v %s", err, errs)
	}
	cmd := exec.CommandContext(w.ctx, adminBin, "--server", "nats://"+freeAddr(t), "--creds", w.creds, "status")
	if out, err := cmd.CombinedOutput(); exitCodeOf(err) != 5 || !strings.Contains(string(out), "nothing listens") {
		t.Errorf("unreachable: %v %s", err, out)
	}

	// The device's switch is held: the rollout waits for it.
	gate, switching := w.devices[0].act.holdSwitch()
	defer close(gate)
	deploy := exec.CommandContext(w.ctx, adminBin, "--server", "nats://"+w.listen, "--creds", w.creds,
		"deploy", "--release", "rel-2", "--group", "web", "--health-timeout", "1h", "--wait")
	var out, errb procOutput
	deploy.Stdout, deploy.Stderr = &out, &errb
	if err := deploy.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- deploy.Wait() }()
	select {
	case <-switching:
	case <-time.After(30 * time.Second):
		t.Fatal("the device never started switching")
	}
	poll.Until(t, 10*time.Second, "deploy --wait shows the device waiting", func() bool { return strings.Contains(out.String(), "1 waiting") })
	_ = deploy.Process.Signal(syscall.SIGINT)
	var err error
	select {
	case err = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("deploy --wait ignored SIGINT")
	}
	var ros []model.Rollout
	if err := json.Unmarshal([]byte(w.mustAdmin("--json", "rollout", "ls")), &ros); err != nil || len(ros) != 1 {
		t.Fatalf("rollout ls: %v %v", err, ros)
	}
	id := ros[0].ID
	if exitCodeOf(err) != 130 || !strings.Contains(errb.String(), "rollout "+id+" continues on the coordinator") ||
		!strings.Contains(errb.String(), "fleet-admin rollout watch "+id) || !strings.Contains(errb.String(), "fleet-admin rollout abort "+id) {
		t.Fatalf("SIGINT: %v\n%s", err, errb.String())
	}

	// The coordinator dies under rollout watch.
	watch := exec.CommandContext(w.ctx, adminBin, "--server", "nats://"+w.listen, "--creds", w.creds, "rollout", "watch", id)
	out, errb = procOutput{}, procOutput{}
	watch.Stdout, watch.Stderr = &out, &errb
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- watch.Wait() }()
	poll.Until(t, 10*time.Second, "rollout watch shows progress", func() bool { return strings.Contains(out.String(), "1 waiting") })
	began := time.Now()
	w.killCoordinator()
	select {
	case err = <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("rollout watch did not notice the coordinator died")
	}
	if exitCodeOf(err) != 5 || time.Since(began) > 10*time.Second || !strings.Contains(errb.String(), "lost the connection") {
		t.Fatalf("coordinator killed: %v after %s\n%s", err, time.Since(began), errb.String())
	}
}
