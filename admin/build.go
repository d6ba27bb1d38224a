package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os/exec"
	"strings"

	"fleet/model"
)

// Releases are built where Nix evaluation belongs: on the admin's machine or
// in CI. Devices only ever fetch the finished closures.

// nixFeatures enables what these commands need on hosts that have not
// switched the features on in nix.conf.
var nixFeatures = []string{"--extra-experimental-features", "nix-command flakes"}

// BuildFlakeHosts builds each host's system (<flake>.<host>.config.system.
// build.toplevel, flake being e.g. ".#nixosConfigurations") and returns the
// store path per host. Nix's progress goes to log.
func BuildFlakeHosts(ctx context.Context, flake string, hosts []string, log io.Writer) (map[string]string, error) {
	if flake == "" || len(hosts) == 0 {
		return nil, fmt.Errorf("--flake needs --hosts (e.g. --flake .#nixosConfigurations --hosts web1,web2)")
	}
	out := map[string]string{}
	for _, h := range hosts {
		if err := model.CheckHostname(h); err != nil {
			return nil, err
		}
		attr := flake + "." + h + ".config.system.build.toplevel"
		args := append(append([]string{}, nixFeatures...), "build", "--no-link", "--json", attr)
		fmt.Fprintf(log, "building %s\n", attr)
		stdout, err := runNix(ctx, log, args...)
		if err != nil {
			return nil, fmt.Errorf("build %s: %w", h, err)
		}
		// --json rather than --print-out-paths: the latter is newer than
		// the Nix of several distributions.
		var built []struct {
			Outputs map[string]string `json:"outputs"`
		}
		if err := json.Unmarshal([]byte(stdout), &built); err != nil || len(built) != 1 {
			return nil, fmt.Errorf("build %s: unexpected output from nix build --json: %q", h, stdout)
		}
		p := built[0].Outputs["out"]
		if err := model.CheckStorePath(p); err != nil {
			return nil, fmt.Errorf("build %s printed %q, not a store path", h, p)
		}
		out[h] = p
	}
	return out, nil
}

// PushClosures copies the closures of paths to the binary cache at url
// (nix copy --to), so devices can fetch them.
func PushClosures(ctx context.Context, url string, paths []string, log io.Writer) error {
	if len(paths) == 0 {
		return nil
	}
	args := append(append([]string{}, nixFeatures...), "copy", "--to", url)
	args = append(args, paths...)
	fmt.Fprintf(log, "copying %s to %s\n", plural(len(paths), "closure", "closures"), url)
	if _, err := runNix(ctx, log, args...); err != nil {
		return fmt.Errorf("push to %s: %w", url, err)
	}
	return nil
}

// runNix runs nix with args; stderr streams to log and its tail is kept for
// the error.
func runNix(ctx context.Context, log io.Writer, args ...string) (string, error) {
	var stdout bytes.Buffer
	tail := &tailBuffer{max: 2048}
	cmd := exec.CommandContext(ctx, "nix", args...)
	cmd.Stdout = &stdout
	cmd.Stderr = io.MultiWriter(log, tail)
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("nix %s: %w: %s", args[len(nixFeatures)], err, strings.TrimSpace(tail.String()))
	}
	return stdout.String(), nil
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = t.b[len(t.b)-t.max:]
	}
	return len(p), nil
}

func (t *tailBuffer) String() string { return string(t.b) }

// DiffReleases compares two releases host by host.
func DiffReleases(a, b *model.Release) model.ReleaseDiff {
	var d model.ReleaseDiff
	ah, bh := map[string]bool{}, map[string]bool{}
	for _, h := range a.Hosts() {
		ah[h] = true
	}
	for _, h := range b.Hosts() {
		bh[h] = true
	}
	for _, h := range b.Hosts() {
		if !ah[h] {
			d.Added = append(d.Added, model.HostChange{Host: h, To: b.Closures[h]})
		} else if a.Closures[h] != b.Closures[h] {
			d.Changed = append(d.Changed, model.HostChange{Host: h, From: a.Closures[h], To: b.Closures[h]})
		}
	}
	for _, h := range a.Hosts() {
		if !bh[h] {
			d.Removed = append(d.Removed, model.HostChange{Host: h, From: a.Closures[h]})
		}
	}
	if a.Default != b.Default {
		d.Default = &model.HostChange{Host: "(default)", From: a.Default, To: b.Default}
	}
	return d
}
