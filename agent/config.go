package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"time"
)

// The agent's config file is one JSON object. Its keys are the flag names
// of `fleet-agent run` (kong reads those: "server", "state-dir", ...) plus
// the structured settings below, which have no flag. The NixOS module
// writes it with builtins.toJSON; nixos-modules/agent-config.example.json
// is a fixture of what it writes.

// FileConfig is the part of the config file that has no flag.
type FileConfig struct {
	HealthChecks []HealthCheck `json:"health-checks,omitempty"`
	// HealthDeadline bounds all health checks of one apply together.
	HealthDeadline Duration `json:"health-deadline,omitempty"`
}

// CheckType is the kind of a health check.
type CheckType string

const (
	CheckSystemd CheckType = "systemd" // units are active
	CheckHTTP    CheckType = "http"    // URL answers with the expected status
	CheckCommand CheckType = "command" // command exits 0
)

// HealthCheck is one check run after a switch; a failure rolls back.
type HealthCheck struct {
	Name string    `json:"name"`
	Type CheckType `json:"type"`
	// systemd
	Units []string `json:"units,omitempty"`
	// http
	URL          string `json:"url,omitempty"`
	ExpectStatus int    `json:"expect-status,omitempty"` // default 200
	// command: argv, run without a shell
	Command []string `json:"command,omitempty"`

	Timeout  Duration `json:"timeout,omitempty"`  // per attempt, default 10s
	Retries  int      `json:"retries,omitempty"`  // extra attempts, default 3
	Interval Duration `json:"interval,omitempty"` // between attempts, default 2s
}

// Duration is a time.Duration written as a Go duration string ("30s").
type Duration time.Duration

func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string like \"30s\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("duration %q: %w", s, err)
	}
	if v < 0 {
		return fmt.Errorf("duration %q is negative", s)
	}
	*d = Duration(v)
	return nil
}

// Std returns d as a time.Duration, or def when d is zero.
func (d Duration) Std(def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return time.Duration(d)
}

// LoadFileConfig reads the structured part of the config file at path.
// An empty path yields an empty config.
func LoadFileConfig(path string) (*FileConfig, error) {
	var fc FileConfig
	if path == "" {
		return &fc, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config %s: %w", path, err)
	}
	if err := json.NewDecoder(bytes.NewReader(b)).Decode(&fc); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if err := fc.Validate(); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return &fc, nil
}

// Validate checks every health check.
func (fc *FileConfig) Validate() error {
	names := map[string]bool{}
	for i, hc := range fc.HealthChecks {
		if hc.Name == "" {
			return fmt.Errorf("health-checks[%d]: name is empty", i)
		}
		if names[hc.Name] {
			return fmt.Errorf("health-checks[%d]: name %q used twice", i, hc.Name)
		}
		names[hc.Name] = true
		if hc.Retries < 0 {
			return fmt.Errorf("health check %q: retries is negative", hc.Name)
		}
		switch hc.Type {
		case CheckSystemd:
			if len(hc.Units) == 0 {
				return fmt.Errorf("health check %q: systemd check names no units", hc.Name)
			}
		case CheckHTTP:
			u, err := url.Parse(hc.URL)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				return fmt.Errorf("health check %q: url %q is not an http(s) URL", hc.Name, hc.URL)
			}
			if hc.ExpectStatus != 0 && (hc.ExpectStatus < 100 || hc.ExpectStatus > 599) {
				return fmt.Errorf("health check %q: expect-status %d is not an HTTP status", hc.Name, hc.ExpectStatus)
			}
		case CheckCommand:
			if len(hc.Command) == 0 || hc.Command[0] == "" {
				return fmt.Errorf("health check %q: command is empty", hc.Name)
			}
		case "":
			return fmt.Errorf("health check %q: type is empty (systemd, http or command)", hc.Name)
		default:
			return fmt.Errorf("health check %q: unknown type %q (systemd, http or command)", hc.Name, hc.Type)
		}
	}
	return nil
}

// ErrNoIdentity is returned when the agent has neither creds nor a token.
var ErrNoIdentity = errors.New("this device is not enrolled and no enrollment token was given: pass --enroll-token or --enroll-token-file (from `fleet-admin token create`)")
