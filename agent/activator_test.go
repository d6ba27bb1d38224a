package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fleet/internal/poll"
	"fleet/model"
)

// gone reports whether pid no longer runs (a zombie counts as gone: in a
// container nobody may reap it).
func gone(pid int) bool {
	if err := syscall.Kill(pid, 0); err != nil {
		return true
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && len(s) > i+2 {
		return s[i+2] == 'Z'
	}
	return false
}

func readPid(t *testing.T, file string) int {
	t.Helper()
	var pid int
	poll.Until(t, 10*time.Second, "pid file "+file, func() bool {
		b, err := os.ReadFile(file)
		if err != nil {
			return false
		}
		pid, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err == nil
	})
	return pid
}

// The reviewer's repro: a check whose command's grandchild holds stdout
// for 25 s, timeout 1s, health deadline 3s. The deadline holds.
func TestCommandCheckDeadlineHolds(t *testing.T) {
	checks := []Retrying{{
		HealthChecker: CommandCheck{CheckName: "slow", Argv: []string{"/bin/sh", "-c", "sleep 25; exit 1"}, Log: zerolog.Nop()},
		Timeout:       time.Second, Retries: 3, Interval: 100 * time.Millisecond,
	}}
	start := time.Now()
	err := RunHealthChecks(context.Background(), checks, 3*time.Second)
	took := time.Since(start)
	var cf *CheckFailed
	if !errors.As(err, &cf) || cf.Check != "slow" {
		t.Fatalf("err = %v, want the slow check failed", err)
	}
	if took > 6*time.Second {
		t.Fatalf("health checks took %s with a 3s deadline", took)
	}
}

// Ending a command ends what it started; so does its exit.
func TestRunCmdKillsProcessGroup(t *testing.T) {
	dir := t.TempDir()
	log := zerolog.Nop()

	// Timeout: the grandchild is killed with the command.
	pidf := filepath.Join(dir, "a.pid")
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	start := time.Now()
	_, err := runCmdOpts(ctx, log, runOpts{}, "/bin/sh", "-c", "sleep 30 & echo $! > "+pidf+"; wait")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 5*time.Second {
		t.Fatalf("err %v after %s, want a deadline error within seconds", err, time.Since(start))
	}
	pid := readPid(t, pidf)
	poll.Until(t, 5*time.Second, "grandchild killed", func() bool { return gone(pid) })

	// A group that ignores SIGTERM gets SIGKILL after the grace.
	pidf = filepath.Join(dir, "b.pid")
	ctx, cancel = context.WithTimeout(context.Background(), 300*time.Millisecond)
	start = time.Now()
	_, err = runCmdOpts(ctx, log, runOpts{Grace: 500 * time.Millisecond}, "/bin/sh", "-c", "trap '' TERM; sleep 30 & echo $! > "+pidf+"; wait")
	cancel()
	if err == nil || time.Since(start) > 5*time.Second {
		t.Fatalf("err %v after %s, want an error within seconds", err, time.Since(start))
	}
	pid = readPid(t, pidf)
	poll.Until(t, 5*time.Second, "TERM-ignoring grandchild killed", func() bool { return gone(pid) })

	// A command that exits leaving a child behind (holding its output)
	// returns at once, and the child goes.
	pidf = filepath.Join(dir, "c.pid")
	start = time.Now()
	out, err := runCmdOpts(context.Background(), log, runOpts{}, "/bin/sh", "-c", "sleep 30 & echo $! > "+pidf+"; echo hello")
	if err != nil || !strings.Contains(out, "hello") || time.Since(start) > 5*time.Second {
		t.Fatalf("out %q err %v after %s", out, err, time.Since(start))
	}
	pid = readPid(t, pidf)
	poll.Until(t, 5*time.Second, "leftover child killed", func() bool { return gone(pid) })
}

// A switch is never cut off when the agent stops: cancelling leaves it
// running; only its deadline ends it.
func TestActivationSurvivesCancel(t *testing.T) {
	dir := t.TempDir()
	started, done := filepath.Join(dir, "started"), filepath.Join(dir, "done")
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := runCmdOpts(ctx, zerolog.Nop(), runOpts{Grace: time.Second, KeepOnCancel: true},
			"/bin/sh", "-c", "touch "+started+"; sleep 1; touch "+done)
		errc <- err
	}()
	poll.Until(t, 10*time.Second, "command started", func() bool { _, err := os.Stat(started); return err == nil })
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err %v, want canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("runCmd did not return on cancel")
	}
	poll.Until(t, 10*time.Second, "command finished on its own", func() bool { _, err := os.Stat(done); return err == nil })
}

// Which argv activates a system, with and without systemd.
func TestActivateArgv(t *testing.T) {
	sys := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system"
	direct := &NixOS{}
	if got := direct.ActivateArgv("fleet-switch-1", sys, model.ActionSwitch); !slices.Equal(got, []string{sys + "/bin/switch-to-configuration", "switch"}) {
		t.Fatalf("without systemd: %q", got)
	}
	sd := &NixOS{SystemdRun: "/run/current-system/sw/bin/systemd-run", LogDir: "/var/lib/fleet-agent"}
	got := sd.ActivateArgv(switchUnit("abc"), sys, model.ActionBoot)
	if got[0] != sd.SystemdRun || !slices.Equal(got[len(got)-2:], []string{sys + "/bin/switch-to-configuration", "boot"}) {
		t.Fatalf("with systemd: %q", got)
	}
	for _, want := range []string{"--unit=fleet-switch-abc", "--wait", "--collect", "--quiet", "--service-type=exec",
		"--property=StandardOutput=truncate:/var/lib/fleet-agent/fleet-switch-abc.log", "--property=StandardError=inherit"} {
		if !slices.Contains(got, want) {
			t.Fatalf("with systemd: %q lacks %s", got, want)
		}
	}
}

// The switch runs what ActivateArgv says: a fake systemd-run sees the unit
// and the command, the profile is set, and its exit status counts.
func TestSwitchUnderSystemdRun(t *testing.T) {
	dir := t.TempDir()
	argvLog := filepath.Join(dir, "argv")
	fake := filepath.Join(dir, "systemd-run")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho \"$@\" >> "+argvLog+"\necho failing >&2\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	n := &NixOS{SystemdRun: fake, Log: zerolog.Nop()}
	ctx := WithAttempt(context.Background(), "feed")
	err := n.activate(ctx, switchUnit(attemptFrom(ctx)), "/nix/store/x-sys", model.ActionTest)
	if err == nil || !strings.Contains(logTail(err), "failing") {
		t.Fatalf("err %v, want the unit's failure with its output", err)
	}
	b, _ := os.ReadFile(argvLog)
	if !strings.Contains(string(b), "--unit=fleet-switch-feed") || !strings.HasSuffix(strings.TrimSpace(string(b)), "/nix/store/x-sys/bin/switch-to-configuration test") {
		t.Fatalf("systemd-run got %q", b)
	}
}

// On resume, a switch unit still running is waited for.
func TestWaitActivations(t *testing.T) {
	dir := t.TempDir()
	calls := filepath.Join(dir, "calls")
	// Active for the first two calls, then inactive.
	script := "#!/bin/sh\necho \"$@\" >> " + calls + "\nn=$(wc -l < " + calls + ")\n" +
		"if [ $n -le 2 ]; then echo active; echo inactive; echo inactive; exit 0; fi\necho inactive; echo inactive; echo inactive; exit 3\n"
	ctl := filepath.Join(dir, "systemctl")
	if err := os.WriteFile(ctl, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	n := &NixOS{SystemdRun: "/bin/true", Systemctl: ctl, Log: zerolog.Nop()}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := n.WaitActivations(ctx, "feed"); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(calls)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 3 || !strings.Contains(lines[0], "fleet-switch-feed.service") || !strings.Contains(lines[0], "fleet-rollback-feed.service") {
		t.Fatalf("systemctl calls: %q", lines)
	}
	// Without systemd there is nothing to wait for.
	if err := (&NixOS{}).WaitActivations(ctx, "feed"); err != nil {
		t.Fatal(err)
	}
}
