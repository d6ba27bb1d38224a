package model

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"
)

// Action is how a device activates a new system, as in
// switch-to-configuration.
type Action string

const (
	ActionSwitch Action = "switch"
	ActionBoot   Action = "boot"
	ActionTest   Action = "test"
)

// ParseAction checks s; "" means switch.
func ParseAction(s string) (Action, error) {
	switch Action(s) {
	case "":
		return ActionSwitch, nil
	case ActionSwitch, ActionBoot, ActionTest:
		return Action(s), nil
	}
	return "", fmt.Errorf("unknown action %q (use switch, boot or test)", s)
}

// Release is a release manifest: which system closure each host runs. It is
// immutable once recorded and always travels signed by its author.
type Release struct {
	ID          string    `json:"id"`
	Name        string    `json:"name,omitempty"`
	CreatedAt   time.Time `json:"created_at"`
	Author      string    `json:"author"`
	Description string    `json:"description,omitempty"`
	// Closures maps a hostname to its system's store path.
	Closures map[string]string `json:"closures,omitempty"`
	// Default is the store path of hosts not named in Closures.
	Default string `json:"default,omitempty"`
	// Substituter is a binary cache to fetch from (nix copy --from). The
	// host's nix.conf still decides which signatures it trusts.
	Substituter string `json:"substituter,omitempty"`
	// FleetCache: devices fetch the closures from the fleet's own binary
	// cache, over their NATS connection (then from Substituter, if set).
	FleetCache bool   `json:"fleet_cache,omitempty"`
	Action     Action `json:"action,omitempty"`
}

// storePathRE matches /nix/store/<32 base32 chars>-<name>.
var storePathRE = regexp.MustCompile(`^/nix/store/[0-9abcdfghijklmnpqrsvwxyz]{32}-[A-Za-z0-9+\-._?=]+$`)

// CheckStorePath reports whether p is a top-level Nix store path.
func CheckStorePath(p string) error {
	if !storePathRE.MatchString(p) || strings.Contains(p, "/..") {
		return fmt.Errorf("%q is not a Nix store path (/nix/store/<hash>-<name>)", p)
	}
	return nil
}

var releaseIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$`)

// CheckReleaseID reports whether id can name a release (it is a KV key).
func CheckReleaseID(id string) error {
	if !releaseIDRE.MatchString(id) {
		return fmt.Errorf("release id %q: use letters, digits, - and _ (at most 128)", id)
	}
	return nil
}

var hostnameRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$`)

// CheckHostname reports whether h is a valid host name (one DNS label, as
// NixOS's networking.hostName).
func CheckHostname(h string) error {
	if !hostnameRE.MatchString(h) {
		return fmt.Errorf("%q is not a valid host name (letters, digits and -, at most 63, not starting or ending with -)", h)
	}
	return nil
}

// Validate checks a manifest before it is signed or after it is received.
func (r *Release) Validate() error {
	if err := CheckReleaseID(r.ID); err != nil {
		return err
	}
	if r.CreatedAt.IsZero() {
		return errors.New("release has no created_at")
	}
	if len(r.Closures) == 0 && r.Default == "" {
		return errors.New("release names no closure: give per-host closures or a default")
	}
	for host, p := range r.Closures {
		if err := CheckHostname(host); err != nil {
			return fmt.Errorf("closure for %s: %w", host, err)
		}
		if err := CheckStorePath(p); err != nil {
			return fmt.Errorf("closure for %s: %w", host, err)
		}
	}
	if r.Default != "" {
		if err := CheckStorePath(r.Default); err != nil {
			return fmt.Errorf("default closure: %w", err)
		}
	}
	if r.Substituter != "" {
		if err := CheckSubstituter(r.Substituter); err != nil {
			return err
		}
	}
	if _, err := ParseAction(string(r.Action)); err != nil {
		return err
	}
	return nil
}

// PathFor returns the store path host should run under this release.
func (r *Release) PathFor(host string) (string, bool) {
	if p, ok := r.Closures[host]; ok {
		return p, true
	}
	if r.Default != "" {
		return r.Default, true
	}
	return "", false
}

// Hosts lists the hosts named in the release, sorted.
func (r *Release) Hosts() []string {
	hs := make([]string, 0, len(r.Closures))
	for h := range r.Closures {
		hs = append(hs, h)
	}
	sort.Strings(hs)
	return hs
}

// VerifyRelease checks a signed manifest against trusted signers and
// returns the release it carries. The author field must name the signer.
func VerifyRelease(s *Signed, trusted []string) (*Release, error) {
	if err := s.Verify(PurposeRelease, trusted); err != nil {
		return nil, fmt.Errorf("release manifest: %w", err)
	}
	var r Release
	if err := s.Decode(&r); err != nil {
		return nil, fmt.Errorf("release manifest: %w", err)
	}
	if r.Author != s.Signer {
		return nil, fmt.Errorf("release manifest: author %s did not sign it (signed by %s)", r.Author, s.Signer)
	}
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("release manifest: %w", err)
	}
	return &r, nil
}

// ReleaseDiff is what changes between two releases, host by host.
type ReleaseDiff struct {
	Added   []HostChange `json:"added,omitempty"`
	Removed []HostChange `json:"removed,omitempty"`
	Changed []HostChange `json:"changed,omitempty"`
	Default *HostChange  `json:"default,omitempty"`
}

// HostChange is one host's closure before and after.
type HostChange struct {
	Host string `json:"host"`
	From string `json:"from,omitempty"`
	To   string `json:"to,omitempty"`
}

// substituterSchemes are the binary cache URL schemes a release may name.
// Others (ssh://, and anything Nix may add) could make the device run a
// command or reach a host the operator never meant to trust.
var substituterSchemes = []string{"https", "http", "file", "s3"}

// CheckSubstituter refuses a substituter that is not a plain binary cache
// URL: an allowed scheme, a host (or a path for file://), no leading '-'
// that a command line would take for a flag, no spaces or control
// characters.
func CheckSubstituter(s string) error {
	bad := fmt.Errorf("substituter %q is not a binary cache URL (https://, http://, file:// or s3://, e.g. https://cache.example.org or file:///srv/cache)", s)
	if s == "" || strings.HasPrefix(s, "-") || len(s) > 2048 || strings.ContainsFunc(s, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return bad
	}
	u, err := url.Parse(s)
	if err != nil || !slices.Contains(substituterSchemes, u.Scheme) || u.Opaque != "" {
		return bad
	}
	if u.Scheme == "file" {
		if u.Path == "" || u.Host != "" {
			return bad
		}
	} else if u.Host == "" || strings.HasPrefix(u.Host, "-") {
		return bad
	}
	return nil
}
