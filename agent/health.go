package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"time"

	"github.com/rs/zerolog"
)

// HealthChecker is one check run after a switch.
type HealthChecker interface {
	Name() string
	// Check runs one attempt; ctx carries its timeout.
	Check(ctx context.Context) error
}

// CheckFailed names the failing health check.
type CheckFailed struct {
	Check string
	Err   error
}

func (e *CheckFailed) Error() string { return fmt.Sprintf("health check %s: %v", e.Check, e.Err) }
func (e *CheckFailed) Unwrap() error { return e.Err }

// Retrying wraps a checker with attempts, per-attempt timeout and a pause.
type Retrying struct {
	HealthChecker
	Timeout  time.Duration
	Retries  int
	Interval time.Duration
}

// Run tries the check until it passes, attempts run out or ctx ends.
func (r Retrying) Run(ctx context.Context) error {
	var last error
	for attempt := 0; attempt <= r.Retries; attempt++ {
		if attempt > 0 {
			t := time.NewTimer(r.Interval)
			select {
			case <-ctx.Done():
				t.Stop()
				return fmt.Errorf("%w (last attempt: %w)", ctx.Err(), last)
			case <-t.C:
			}
		}
		actx, cancel := context.WithTimeout(ctx, r.Timeout)
		last = r.Check(actx)
		cancel()
		if last == nil {
			return nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	return last
}

// NewHealthChecks builds the checkers of a config file.
func NewHealthChecks(fc *FileConfig, log zerolog.Logger) []Retrying {
	var out []Retrying
	for _, hc := range fc.HealthChecks {
		var c HealthChecker
		switch hc.Type {
		case CheckSystemd:
			c = SystemdCheck{CheckName: hc.Name, Units: hc.Units, Log: log}
		case CheckHTTP:
			c = HTTPCheck{CheckName: hc.Name, URL: hc.URL, ExpectStatus: hc.ExpectStatus}
		case CheckCommand:
			c = CommandCheck{CheckName: hc.Name, Argv: hc.Command, Log: log}
		default:
			continue // Validate refused these already
		}
		out = append(out, Retrying{
			HealthChecker: c,
			Timeout:       hc.Timeout.Std(10 * time.Second),
			Retries:       hc.EffectiveRetries(),
			Interval:      hc.Interval.Std(2 * time.Second),
		})
	}
	return out
}

// RunHealthChecks runs checks in order within deadline; the first failure
// is returned as *CheckFailed.
func RunHealthChecks(ctx context.Context, checks []Retrying, deadline time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, deadline)
	defer cancel()
	for _, c := range checks {
		if err := c.Run(ctx); err != nil {
			return &CheckFailed{Check: c.Name(), Err: err}
		}
	}
	return nil
}

// SystemdCheck passes when every unit is active.
type SystemdCheck struct {
	CheckName string
	Units     []string
	Log       zerolog.Logger
}

func (c SystemdCheck) Name() string { return c.CheckName }

func (c SystemdCheck) Check(ctx context.Context) error {
	for _, u := range c.Units {
		out, err := runCmdOpts(ctx, c.Log, checkRun, "systemctl", "is-active", "--", u)
		if err == nil {
			continue
		}
		// is-active exits non-zero with the state as its last line; any
		// other failure (no systemctl, no systemd) is said as such.
		state := strings.TrimSpace(lastLines(out, 1))
		var exit *exec.ExitError
		if !errors.As(err, &exit) || !knownUnitState(state) {
			return fmt.Errorf("unit %s: systemctl is-active: %w", u, err)
		}
		return fmt.Errorf("unit %s is %s", u, state)
	}
	return nil
}

// knownUnitState reports whether s is a state systemctl is-active prints.
func knownUnitState(s string) bool {
	switch s {
	case "active", "reloading", "inactive", "failed", "activating", "deactivating", "maintenance", "refreshing", "unknown":
		return true
	}
	return false
}

// HTTPCheck passes when URL answers with ExpectStatus (default 200).
type HTTPCheck struct {
	CheckName    string
	URL          string
	ExpectStatus int
}

func (c HTTPCheck) Name() string { return c.CheckName }

func (c HTTPCheck) Check(ctx context.Context) error {
	want := c.ExpectStatus
	if want == 0 {
		want = http.StatusOK
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.URL, nil)
	if err != nil {
		return fmt.Errorf("request %s: %w", RedactURL(c.URL), err)
	}
	// No redirects: the status the service itself answers is what counts.
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", RedactURL(c.URL), err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode != want {
		return fmt.Errorf("GET %s: status %d, want %d", RedactURL(c.URL), resp.StatusCode, want)
	}
	return nil
}

// CommandCheck passes when the command exits 0. It runs without a shell.
type CommandCheck struct {
	CheckName string
	Argv      []string
	Log       zerolog.Logger
}

func (c CommandCheck) Name() string { return c.CheckName }

func (c CommandCheck) Check(ctx context.Context) error {
	if len(c.Argv) == 0 {
		return errors.New("no command")
	}
	_, err := runCmdOpts(ctx, c.Log, checkRun, c.Argv[0], c.Argv[1:]...)
	return err
}

// checkRun ends a check's command (and all it started) with SIGKILL when
// the attempt's timeout passes: a check has nothing to clean up.
var checkRun = runOpts{}
