package integration

import (
	"bytes"
	"context"
	"encoding/json"
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

// procOutput collects a process's output, to read while it runs.
type procOutput struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (o *procOutput) Write(b []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.Write(b)
}

func (o *procOutput) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.String()
}

// agentProc is a running fleet-agent binary.
type agentProc struct {
	cmd  *exec.Cmd
	out  procOutput
	done chan error
}

func (p *agentProc) Write(b []byte) (int, error) { return p.out.Write(b) }

func (p *agentProc) output() string { return p.out.String() }

// startAgentBin runs `fleet-agent run` with the world's server and args.
func (w *fleetWorld) startAgentBin(t *testing.T, stateDir string, args ...string) *agentProc {
	t.Helper()
	// The agent checks at start that the running system's link exists.
	if _, err := os.Lstat(filepath.Join(stateDir, "current")); err != nil {
		if err := os.Symlink(t.TempDir(), filepath.Join(stateDir, "current")); err != nil {
			t.Fatal(err)
		}
	}
	base := []string{"--log-format", "json", "run", "--server", "nats://" + w.listen, "--state-dir", stateDir,
		"--release-signer", w.signer, "--hostname", "laptop-1",
		"--profile", filepath.Join(stateDir, "profile"), "--current-system", filepath.Join(stateDir, "current"),
		"--booted-system", filepath.Join(stateDir, "booted")}
	p := &agentProc{done: make(chan error, 1)}
	p.cmd = exec.Command(agentBin, append(base, args...)...)
	p.cmd.Stdout, p.cmd.Stderr = p, p
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("agent output:\n%s", tail(p.output(), 4000))
		}
	})
	return p
}

func (w *fleetWorld) devicesJSON(t *testing.T) []model.DeviceView {
	t.Helper()
	var ds []model.DeviceView
	if err := json.Unmarshal([]byte(w.mustAdmin("--json", "devices", "ls")), &ds); err != nil {
		t.Fatal(err)
	}
	return ds
}

// The real fleet-agent binary: a clear error without creds or token,
// enrolment with a token file into a pending device that gets nothing until
// approved, creds kept 0600 and reused on restart, and a revoked device's
// agent ends with an error that says what to do.
func TestAgentBinaryEnrolment(t *testing.T) {
	w := newFleetWorld(t)
	ctx, cancel := context.WithTimeout(w.ctx, 2*time.Minute)
	defer cancel()
	state := t.TempDir()

	// The host is checked first: the running system's link must exist.
	out, err := exec.CommandContext(ctx, agentBin, "run", "--server", "nats://"+w.listen, "--state-dir", state,
		"--release-signer", w.signer, "--current-system", filepath.Join(state, "no-such-link")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--current-system "+filepath.Join(state, "no-such-link")) {
		t.Fatalf("no current system: %v\n%s", err, out)
	}
	current := filepath.Join(t.TempDir(), "current-system")
	if err := os.Symlink(t.TempDir(), current); err != nil {
		t.Fatal(err)
	}
	// No creds, no token.
	out, err = exec.CommandContext(ctx, agentBin, "run", "--server", "nats://"+w.listen, "--state-dir", state,
		"--release-signer", w.signer, "--current-system", current).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "no enrollment token was given") {
		t.Fatalf("no token: %v\n%s", err, out)
	}
	// A token file that is not there is named.
	out, err = exec.CommandContext(ctx, agentBin, "run", "--server", "nats://"+w.listen, "--state-dir", state,
		"--release-signer", w.signer, "--current-system", current, "--enroll-token-file", "/nonexistent/token").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "/nonexistent/token") {
		t.Fatalf("missing token file: %v\n%s", err, out)
	}

	token := strings.TrimSpace(w.mustAdmin("token", "create", "--group", "laptops", "--uses", "1", "--ttl", "1h", "--approval"))
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p := w.startAgentBin(t, state, "--enroll-token-file", tokenFile, "--approval-poll", "500ms")
	var dev model.DeviceView
	poll.Until(w.t, 30*time.Second, "device enrolled and online", func() bool {
		for _, d := range w.devicesJSON(t) {
			if d.Name == "laptop-1" && d.Online {
				dev = d
				return true
			}
		}
		return false
	})
	if dev.Status != model.DevicePending || strings.Join(dev.Groups, ",") != "laptops" {
		t.Fatalf("enrolled device %+v", dev)
	}
	for _, f := range []string{"agent.creds", "agent.nk", "agent.xk"} {
		fi, err := os.Stat(filepath.Join(state, f))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v", f, err, fi)
		}
	}
	// Pending: no rollout reaches it.
	w.release("rel-1", fakePath("laptop"))
	if _, errs, err := w.admin("deploy", "--release", "rel-1", "--group", "laptops"); err == nil || !strings.Contains(errs, "no active devices") {
		t.Fatalf("group deploy to a pending device: %v %s", err, errs)
	}
	if _, errs, err := w.admin("deploy", "--release", "rel-1", "--device", "laptop-1"); err == nil || !strings.Contains(errs, "pending") {
		t.Fatalf("device deploy to a pending device: %v %s", err, errs)
	}
	// Pending creds can only ask whether the device was approved.
	if cr, err := accounts.ReadCreds(filepath.Join(state, "agent.creds")); err != nil || cr.Role() != subjects.RolePending {
		t.Fatalf("pending device's creds: role %q, %v", cr.Role(), err)
	}
	if !strings.Contains(p.output(), "waiting for approval") {
		t.Errorf("the pending agent does not say it waits for approval:\n%s", p.output())
	}
	w.mustAdmin("devices", "approve", "laptop-1")
	// The waiting agent learns of the approval and runs with agent creds.
	poll.Until(w.t, 30*time.Second, "approved device active with agent creds", func() bool {
		cr, err := accounts.ReadCreds(filepath.Join(state, "agent.creds"))
		return err == nil && cr.Role() == subjects.RoleAgent && strings.Contains(p.output(), "fleet-agent running")
	})

	// Restart: the creds are reused, no token needed (the token is used up).
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		if err != nil {
			t.Fatalf("agent stopped with %v", err)
		}
		p.done <- nil // for the cleanup
	case <-time.After(20 * time.Second):
		t.Fatal("agent did not stop on SIGTERM")
	}
	credsBefore, _ := os.ReadFile(filepath.Join(state, "agent.creds"))
	p = w.startAgentBin(t, state)
	poll.Until(w.t, 30*time.Second, "device back online, active", func() bool {
		for _, d := range w.devicesJSON(t) {
			if d.Name == "laptop-1" && d.Online && d.Status == model.DeviceActive {
				return true
			}
		}
		return false
	})
	if credsAfter, _ := os.ReadFile(filepath.Join(state, "agent.creds")); !bytes.Equal(credsBefore, credsAfter) {
		t.Fatal("the restart enrolled again instead of reusing agent.creds")
	}

	// Revoked: the agent ends with an error saying what to do.
	w.mustAdmin("devices", "revoke", "laptop-1")
	select {
	case err := <-p.done:
		p.done <- err
		if err == nil || !strings.Contains(p.output(), "enrol again with a new token") {
			t.Fatalf("revoked agent: exit %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the revoked agent kept running")
	}
}
