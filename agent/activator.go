package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"fleet/internal/lockedbuf"
	"fleet/model"
)

// Activator fetches and activates system closures. NixOS is the one built
// here; darwin or tests can plug in their own.
type Activator interface {
	// Current returns the store path of the running system.
	Current(ctx context.Context) (string, error)
	// Fetch makes path valid in the local store, from substituter when it
	// is not empty, else from the host's substituters.
	Fetch(ctx context.Context, path, substituter string) error
	// Snapshot records what Rollback needs to return to the present.
	Snapshot(ctx context.Context) (Generation, error)
	// Switch makes path the system profile and activates it.
	Switch(ctx context.Context, path string, action model.Action) error
	// Rollback returns to the generation of a Snapshot.
	Rollback(ctx context.Context, to Generation, action model.Action) error
	// Active reports whether path is in effect for action: the running
	// system for switch and test, the profile for boot.
	Active(ctx context.Context, path string, action model.Action) (bool, error)
}

// Generation is what ran before an apply, for rollback.
type Generation struct {
	// Number is the profile generation (0 when unknown).
	Number int `json:"number,omitempty"`
	// System is the store path that ran.
	System string `json:"system,omitempty"`
	// Profile is the store path the system profile pointed at: the next
	// boot's system. It differs from System when a boot was pending or a
	// test activation ran ("" when unknown: roll back to System).
	Profile string `json:"profile,omitempty"`
}

// CmdError is a failed external command with the tail of its output.
type CmdError struct {
	Cmd  string
	Err  error
	Tail string
}

func (e *CmdError) Error() string {
	if e.Tail == "" {
		return fmt.Sprintf("%s: %v", e.Cmd, e.Err)
	}
	return fmt.Sprintf("%s: %v: %s", e.Cmd, e.Err, lastLines(e.Tail, 1))
}

func (e *CmdError) Unwrap() error { return e.Err }

// logTail returns the output tail of the CmdError in err, if any.
func logTail(err error) string {
	var ce *CmdError
	if errors.As(err, &ce) {
		return ce.Tail
	}
	return ""
}

type attemptKey struct{}

// WithAttempt tags ctx with the apply attempt, which names the systemd
// units a switch and a rollback run in.
func WithAttempt(ctx context.Context, attempt string) context.Context {
	return context.WithValue(ctx, attemptKey{}, attempt)
}

func attemptFrom(ctx context.Context) string {
	if s, _ := ctx.Value(attemptKey{}).(string); s != "" {
		return s
	}
	return newAttempt()
}

// Unit names of an attempt's switch and rollback (systemd only).
func switchUnit(attempt string) string   { return "fleet-switch-" + attempt }
func rollbackUnit(attempt string) string { return "fleet-rollback-" + attempt }

// NixOS activates systems with nix, nix-env and switch-to-configuration.
type NixOS struct {
	Profile       string // e.g. /nix/var/nix/profiles/system
	CurrentSystem string // e.g. /run/current-system
	// SystemdRun, when set, is the systemd-run binary: switch-to-configuration
	// then runs in a transient unit (fleet-switch-<attempt>), as nixos-rebuild
	// does, so it outlives an agent that is stopped or restarted meanwhile.
	// Empty runs it as a child in its own process group. See DetectSystemd.
	SystemdRun string
	// Systemctl is the systemctl binary (with SystemdRun), to wait for a
	// switch unit an earlier agent started.
	Systemctl string
	// LogDir, with SystemdRun, receives the switch unit's output (it is
	// read back for errors and removed), so no pipe ties the unit to the
	// agent process.
	LogDir string
	Log    zerolog.Logger
}

// DetectSystemd returns the systemd-run and systemctl binaries when systemd
// runs this host (/run/systemd/system exists and both are in PATH), else "".
func DetectSystemd() (systemdRun, systemctl string) {
	if fi, err := os.Stat("/run/systemd/system"); err != nil || !fi.IsDir() {
		return "", ""
	}
	run, err1 := exec.LookPath("systemd-run")
	ctl, err2 := exec.LookPath("systemctl")
	if err1 != nil || err2 != nil {
		return "", ""
	}
	return run, ctl
}

// Current reads the current-system link.
func (n *NixOS) Current(ctx context.Context) (string, error) {
	p, err := filepath.EvalSymlinks(n.CurrentSystem)
	if err != nil {
		return "", fmt.Errorf("current system: %w", err)
	}
	return p, nil
}

// Fetch copies path into the local store. Trust comes from nix.conf's
// trusted-public-keys; nothing here widens it.
func (n *NixOS) Fetch(ctx context.Context, path, substituter string) error {
	if err := model.CheckStorePath(path); err != nil {
		return err
	}
	if substituter != "" {
		_, err := n.run(ctx, "nix", "copy", "--extra-experimental-features", "nix-command", "--from", substituter, path)
		return err
	}
	_, err := n.run(ctx, "nix-store", "--realise", path)
	return err
}

var genLinkRE = regexp.MustCompile(`-(\d+)-link$`)

// Snapshot reads the profile's generation and system and the running
// system.
func (n *NixOS) Snapshot(ctx context.Context) (Generation, error) {
	var g Generation
	if t, err := os.Readlink(n.Profile); err == nil {
		if m := genLinkRE.FindStringSubmatch(t); m != nil {
			g.Number, _ = strconv.Atoi(m[1])
		}
	}
	if p, err := filepath.EvalSymlinks(n.Profile); err == nil {
		g.Profile = p
	}
	cur, err := n.Current(ctx)
	if err != nil {
		return g, err
	}
	g.System = cur
	return g, nil
}

// Switch activates path as nixos-rebuild does: switch and boot set the
// system profile to path first; test leaves the profile alone.
func (n *NixOS) Switch(ctx context.Context, path string, action model.Action) error {
	if err := model.CheckStorePath(path); err != nil {
		return err
	}
	if action != model.ActionTest {
		if err := n.setProfile(ctx, path); err != nil {
			return err
		}
	}
	return n.activate(ctx, switchUnit(attemptFrom(ctx)), path, action)
}

func (n *NixOS) setProfile(ctx context.Context, path string) error {
	if err := os.MkdirAll(filepath.Dir(n.Profile), 0o755); err != nil {
		return fmt.Errorf("profile directory: %w", err)
	}
	_, err := n.run(ctx, "nix-env", "-p", n.Profile, "--set", path)
	return err
}

// Rollback returns to the state of a Snapshot for an apply with action:
//   - switch: the profile goes back to to's generation, to's running system
//     is switched to (and to's profile system made the boot default when a
//     boot was pending);
//   - boot: the profile goes back and its system's switch-to-configuration
//     boot runs; the running system is untouched;
//   - test: to's running system is activated with test; the profile was
//     never changed.
func (n *NixOS) Rollback(ctx context.Context, to Generation, action model.Action) error {
	unit := rollbackUnit(attemptFrom(ctx))
	if action == model.ActionTest {
		if to.System == "" {
			return errors.New("no previous running system")
		}
		return n.activate(ctx, unit, to.System, model.ActionTest)
	}
	if err := n.restoreProfile(ctx, to); err != nil {
		return err
	}
	bootSys := to.Profile
	if bootSys == "" {
		p, err := filepath.EvalSymlinks(n.Profile)
		if err != nil {
			return fmt.Errorf("profile after rollback: %w", err)
		}
		bootSys = p
	}
	if action == model.ActionBoot {
		return n.activate(ctx, unit, bootSys, model.ActionBoot)
	}
	sys := to.System
	if sys == "" {
		sys = bootSys
	}
	if to.Profile == "" || to.Profile == sys {
		return n.activate(ctx, unit, sys, model.ActionSwitch)
	}
	// A boot was pending before: run the old system again and keep the
	// pending one as the boot default.
	if err := n.activate(ctx, unit, sys, model.ActionTest); err != nil {
		return err
	}
	return n.activate(ctx, unit+"-boot", bootSys, model.ActionBoot)
}

// restoreProfile points the profile back at to's generation: by number
// when known, else by setting its system (which works on a profile with a
// single generation, where --rollback has nothing to go back to).
func (n *NixOS) restoreProfile(ctx context.Context, to Generation) error {
	var err error
	switch {
	case to.Number > 0:
		_, err = n.run(ctx, "nix-env", "-p", n.Profile, "--switch-generation", strconv.Itoa(to.Number))
		if err == nil || to.Profile == "" {
			return err
		}
		// The generation may have been deleted meanwhile: set its system.
		n.Log.Warn().Err(err).Msg("switching the profile generation failed; setting its system instead")
		return n.setProfile(ctx, to.Profile)
	case to.Profile != "":
		return n.setProfile(ctx, to.Profile)
	case to.System != "":
		return n.setProfile(ctx, to.System)
	default:
		_, err = n.run(ctx, "nix-env", "-p", n.Profile, "--rollback")
		return err
	}
}

// Active compares path with the running system, or with the profile for
// boot (a boot switch changes the next boot only).
func (n *NixOS) Active(ctx context.Context, path string, action model.Action) (bool, error) {
	link := n.CurrentSystem
	if action == model.ActionBoot {
		link = n.Profile
	}
	p, err := filepath.EvalSymlinks(link)
	if err != nil {
		return false, fmt.Errorf("read %s: %w", link, err)
	}
	return p == path, nil
}

// ActivateArgv is the command that runs system's switch-to-configuration
// action: in the transient unit named unit when SystemdRun is set, else
// directly.
func (n *NixOS) ActivateArgv(unit, system string, action model.Action) []string {
	stc := filepath.Join(system, "bin", "switch-to-configuration")
	if n.SystemdRun == "" {
		return []string{stc, string(action)}
	}
	argv := []string{n.SystemdRun,
		"--unit=" + unit, "--description=fleet-agent: switch-to-configuration " + string(action) + " " + system,
		"--wait", "--collect", "--quiet", "--no-ask-password", "--service-type=exec",
		// What nixos-rebuild passes through.
		"--setenv=LOCALE_ARCHIVE", "--setenv=NIXOS_INSTALL_BOOTLOADER",
	}
	if n.LogDir != "" {
		// Output to a file, not a pipe to this process: the unit must not
		// fail writing when the agent is gone.
		argv = append(argv, "--property=StandardOutput=truncate:"+n.unitLog(unit), "--property=StandardError=inherit")
	}
	return append(argv, stc, string(action))
}

func (n *NixOS) unitLog(unit string) string { return filepath.Join(n.LogDir, unit+".log") }

// activate runs system's switch-to-configuration action. When ctx is
// cancelled (the agent stops) the activation is left running, never cut
// off half way: the next agent decides from its outcome. When ctx's
// deadline passes it is stopped.
func (n *NixOS) activate(ctx context.Context, unit, system string, action model.Action) error {
	argv := n.ActivateArgv(unit, system, action)
	o := runOpts{Grace: 30 * time.Second, KeepOnCancel: true}
	_, err := runCmdOpts(ctx, n.Log, o, argv[0], argv[1:]...)
	if n.SystemdRun != "" {
		if errors.Is(err, context.DeadlineExceeded) && n.Systemctl != "" {
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			_, _ = runCmd(sctx, n.Log, n.Systemctl, "stop", "--", unit+".service")
			cancel()
		}
		if n.LogDir != "" && !errors.Is(err, context.Canceled) {
			if b, rerr := os.ReadFile(n.unitLog(unit)); rerr == nil {
				if out := string(b); out != "" {
					n.Log.Info().Str("unit", unit).Str("output", lastLines(out, 40)).Msg("switch output")
					var ce *CmdError
					if errors.As(err, &ce) && ce.Tail == "" {
						ce.Tail = lastLines(out, 20)
					}
				}
			}
			_ = os.Remove(n.unitLog(unit))
		}
	}
	return err
}

// WaitActivations waits while a switch or rollback unit of attempt (started
// by an agent before a restart) still runs. Without systemd it returns at
// once.
func (n *NixOS) WaitActivations(ctx context.Context, attempt string) error {
	if n.SystemdRun == "" || n.Systemctl == "" {
		return nil
	}
	units := []string{switchUnit(attempt) + ".service", rollbackUnit(attempt) + ".service", rollbackUnit(attempt) + "-boot.service"}
	logged := false
	for {
		out, _ := runCmd(ctx, n.Log, n.Systemctl, append([]string{"is-active", "--"}, units...)...)
		busy := false
		for _, st := range strings.Fields(out) {
			switch st {
			case "active", "activating", "deactivating", "reloading", "refreshing":
				busy = true
			}
		}
		if !busy {
			return nil
		}
		if !logged {
			n.Log.Info().Str("attempt", attempt).Msg("waiting for the interrupted apply's switch unit to finish")
			logged = true
		}
		t := time.NewTimer(time.Second)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// run runs a command under ctx, logs its output and keeps the tail for
// errors.
func (n *NixOS) run(ctx context.Context, name string, args ...string) (string, error) {
	return runCmd(ctx, n.Log, name, args...)
}

// runOpts tune how a command ends.
type runOpts struct {
	// Grace is the time between SIGTERM and SIGKILL to the command's
	// process group when ctx ends; 0 sends SIGKILL at once.
	Grace time.Duration
	// KeepOnCancel leaves the command running when ctx is cancelled (not
	// when its deadline passes): runCmd returns at once, the command goes
	// on in its own process group.
	KeepOnCancel bool
}

// runCmd runs a command with a 10 s grace between SIGTERM and SIGKILL.
func runCmd(ctx context.Context, log zerolog.Logger, name string, args ...string) (string, error) {
	return runCmdOpts(ctx, log, runOpts{Grace: 10 * time.Second}, name, args...)
}

// runCmdOpts runs a command in its own process group, so ending it (ctx
// done) ends everything it started, and no grandchild holding its output
// open can make it outlast ctx. Processes the command leaves behind when it
// exits are killed too.
func runCmdOpts(ctx context.Context, log zerolog.Logger, o runOpts, name string, args ...string) (string, error) {
	desc := cmdDesc(name, args)
	log.Debug().Str("cmd", desc).Msg("running")
	pr, pw, err := os.Pipe()
	if err != nil {
		return "", &CmdError{Cmd: desc, Err: err}
	}
	cmd := exec.Command(name, args...)
	// Output goes to a pipe this function reads itself (not one exec
	// copies): Wait returns when the command exits, whoever else holds
	// the pipe.
	cmd.Stdout, cmd.Stderr = pw, pw
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		return "", &CmdError{Cmd: desc, Err: err}
	}
	pw.Close()
	pgid := cmd.Process.Pid
	buf := lockedbuf.Buffer{Limit: 1 << 20} // a runaway build log keeps its last half megabyte
	readDone := make(chan struct{})
	go func() {
		_, _ = io.Copy(&buf, pr)
		close(readDone)
	}()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	var waitErr error
	select {
	case waitErr = <-exited:
	case <-ctx.Done():
		if o.KeepOnCancel && errors.Is(ctx.Err(), context.Canceled) {
			// Left running; the reader keeps draining until the process
			// ends or this one exits.
			return buf.String(), &CmdError{Cmd: desc, Err: fmt.Errorf("left running: %w", ctx.Err())}
		}
		waitErr = stopGroup(pgid, o.Grace, exited)
		if waitErr == nil {
			waitErr = errors.New("stopped")
		}
	}
	// Whatever the command left behind in its group goes with it.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	// A process that left the group may still hold the pipe: bound the wait.
	t := time.NewTimer(2 * time.Second)
	select {
	case <-readDone:
	case <-t.C:
	}
	t.Stop()
	pr.Close()
	out := buf.String()
	if out != "" {
		log.Info().Str("cmd", desc).Str("output", lastLines(out, 40)).Msg("command output")
	}
	if waitErr != nil {
		if ctx.Err() != nil {
			waitErr = fmt.Errorf("%w (%w)", waitErr, ctx.Err())
		}
		return out, &CmdError{Cmd: desc, Err: waitErr, Tail: lastLines(out, 20)}
	}
	return out, nil
}

// cmdDesc is the command line for logs and errors, with the userinfo of
// URLs (a substituter's user:password@) redacted.
func cmdDesc(name string, args []string) string {
	parts := make([]string, 0, len(args)+1)
	for _, a := range append([]string{name}, args...) {
		if strings.Contains(a, "://") && strings.Contains(a, "@") {
			a = RedactURL(a)
		}
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}

// stopGroup ends process group pgid: SIGTERM, then SIGKILL after grace
// (at once when grace is 0). It returns the leader's exit.
func stopGroup(pgid int, grace time.Duration, exited <-chan error) error {
	if grace > 0 {
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		t := time.NewTimer(grace)
		defer t.Stop()
		select {
		case err := <-exited:
			return err
		case <-t.C:
		}
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	return <-exited
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
