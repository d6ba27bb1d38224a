package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
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

	Timeout Duration `json:"timeout,omitempty"` // per attempt, default 10s
	// Retries is the number of extra attempts: 3 when the config leaves it
	// out, none when it says "retries": 0 (RetriesSet).
	Retries  int      `json:"retries,omitempty"`
	Interval Duration `json:"interval,omitempty"` // between attempts, default 2s
	// RetriesSet records that the config gave retries, 0 included (an int
	// cannot tell "retries": 0 from no retries key).
	RetriesSet bool `json:"-"`
}

// DefaultRetries is the extra attempts of a check that does not say.
const DefaultRetries = 3

// EffectiveRetries is Retries, or DefaultRetries when it was not given.
func (hc HealthCheck) EffectiveRetries() int {
	if hc.Retries == 0 && !hc.RetriesSet {
		return DefaultRetries
	}
	return hc.Retries
}

// UnmarshalJSON decodes one check strictly: an unknown key (a typo such as
// "expect_status") is an error, not a silently ignored setting.
func (hc *HealthCheck) UnmarshalJSON(b []byte) error {
	type plain HealthCheck
	var p plain
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return err
	}
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(b, &keys); err != nil {
		return err
	}
	for k, v := range keys {
		// encoding/json matches keys without regard to case.
		if strings.EqualFold(k, "retries") && string(bytes.TrimSpace(v)) != "null" {
			p.RetriesSet = true
		}
	}
	*hc = HealthCheck(p)
	return nil
}

// MarshalJSON writes retries when it was given, 0 included.
func (hc HealthCheck) MarshalJSON() ([]byte, error) {
	type plain HealthCheck
	out := struct {
		plain
		Retries *int `json:"retries,omitempty"`
	}{plain: plain(hc)}
	if hc.Retries != 0 || hc.RetriesSet {
		r := hc.Retries
		out.Retries = &r
	}
	return json.Marshal(out)
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
	if err := decodeFileConfig(b, &fc); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if err := fc.Validate(); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return &fc, nil
}

// decodeFileConfig reads the keys FileConfig owns, strictly; the other
// top-level keys are flags, which kong reads.
func decodeFileConfig(b []byte, fc *FileConfig) error {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(b, &top); err != nil {
		return err
	}
	if raw, ok := top["health-deadline"]; ok {
		if err := json.Unmarshal(raw, &fc.HealthDeadline); err != nil {
			return fmt.Errorf("health-deadline: %w", err)
		}
	}
	raw, ok := top["health-checks"]
	if !ok || string(bytes.TrimSpace(raw)) == "null" {
		return nil
	}
	var list []json.RawMessage
	if err := json.Unmarshal(raw, &list); err != nil {
		return fmt.Errorf("health-checks must be a list: %w", err)
	}
	for i, item := range list {
		var hc HealthCheck
		if err := json.Unmarshal(item, &hc); err != nil {
			var named struct {
				Name string `json:"name"`
			}
			_ = json.Unmarshal(item, &named)
			return fmt.Errorf("health-checks[%d] (%q): %w", i, named.Name, err)
		}
		fc.HealthChecks = append(fc.HealthChecks, hc)
	}
	return nil
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
				return fmt.Errorf("health check %q: url %q is not an http(s) URL", hc.Name, RedactURL(hc.URL))
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
