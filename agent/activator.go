package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"

	"github.com/rs/zerolog"

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

// Generation is a system profile generation.
type Generation struct {
	// Number is the profile generation (0 when the profile has none).
	Number int `json:"number,omitempty"`
	// System is the store path that ran.
	System string `json:"system,omitempty"`
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

// NixOS activates systems with nix, nix-env and switch-to-configuration.
type NixOS struct {
	Profile       string // e.g. /nix/var/nix/profiles/system
	CurrentSystem string // e.g. /run/current-system
	Log           zerolog.Logger
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

// Snapshot reads the profile's generation and the running system.
func (n *NixOS) Snapshot(ctx context.Context) (Generation, error) {
	var g Generation
	if t, err := os.Readlink(n.Profile); err == nil {
		if m := genLinkRE.FindStringSubmatch(t); m != nil {
			g.Number, _ = strconv.Atoi(m[1])
		}
	}
	cur, err := n.Current(ctx)
	if err != nil {
		return g, err
	}
	g.System = cur
	return g, nil
}

// Switch sets the profile to path and runs its switch-to-configuration.
func (n *NixOS) Switch(ctx context.Context, path string, action model.Action) error {
	if err := model.CheckStorePath(path); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(n.Profile), 0o755); err != nil {
		return fmt.Errorf("profile directory: %w", err)
	}
	if _, err := n.run(ctx, "nix-env", "-p", n.Profile, "--set", path); err != nil {
		return err
	}
	_, err := n.run(ctx, filepath.Join(path, "bin", "switch-to-configuration"), string(action))
	return err
}

// Rollback switches the profile back to to's generation (or the previous
// one when unknown) and activates the system it held.
func (n *NixOS) Rollback(ctx context.Context, to Generation, action model.Action) error {
	var err error
	if to.Number > 0 {
		_, err = n.run(ctx, "nix-env", "-p", n.Profile, "--switch-generation", strconv.Itoa(to.Number))
	} else {
		_, err = n.run(ctx, "nix-env", "-p", n.Profile, "--rollback")
	}
	if err != nil {
		return err
	}
	sys := to.System
	if sys == "" {
		if sys, err = filepath.EvalSymlinks(n.Profile); err != nil {
			return fmt.Errorf("profile after rollback: %w", err)
		}
	}
	_, err = n.run(ctx, filepath.Join(sys, "bin", "switch-to-configuration"), string(action))
	return err
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

// run runs a command under ctx, logs its output and keeps the tail for
// errors.
func (n *NixOS) run(ctx context.Context, name string, args ...string) (string, error) {
	return runCmd(ctx, n.Log, name, args...)
}

func runCmd(ctx context.Context, log zerolog.Logger, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var buf syncBuffer
	cmd.Stdout = &buf
	cmd.Stderr = &buf
	desc := name + " " + strings.Join(args, " ")
	log.Debug().Str("cmd", desc).Msg("running")
	err := cmd.Run()
	out := buf.String()
	if out != "" {
		log.Info().Str("cmd", desc).Str("output", lastLines(out, 40)).Msg("command output")
	}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", err, ctx.Err())
		}
		return out, &CmdError{Cmd: desc, Err: err, Tail: lastLines(out, 20)}
	}
	return out, nil
}

// syncBuffer is a bytes.Buffer safe for stdout and stderr together.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	// Bound memory: a runaway build log keeps only its last megabyte.
	if s.b.Len() > 1<<20 {
		rest := s.b.Bytes()[s.b.Len()-(512<<10):]
		s.b = *bytes.NewBuffer(append([]byte(nil), rest...))
	}
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
