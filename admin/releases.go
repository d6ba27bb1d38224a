package admin

import (
	"bytes"
	"cmp"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"fleet/model"
	"fleet/subjects"
)

// ReleaseCmd is `fleet-admin release`.
type ReleaseCmd struct {
	Create ReleaseCreateCmd `cmd:"" help:"Record a signed release: which system closure each host runs."`
	Ls     ReleaseLsCmd     `cmd:"" help:"List releases."`
	Show   ReleaseShowCmd   `cmd:"" help:"Show a release."`
	Diff   ReleaseDiffCmd   `cmd:"" help:"Compare two releases host by host."`
}

// ReleaseCreateCmd is `fleet-admin release create`.
type ReleaseCreateCmd struct {
	Name        string   `help:"Release id (letters, digits, - and _); default: rel-<time>-<random>."`
	Closure     []string `help:"HOST=/nix/store/... (repeatable)." placeholder:"HOST=PATH"`
	Default     string   `help:"Store path for hosts without their own closure." placeholder:"PATH"`
	File        string   `help:"Release JSON (closures, default, substituter, action, description)." type:"existingfile"`
	Flake       string   `help:"Build hosts from this flake attribute set, e.g. .#nixosConfigurations." placeholder:"REF"`
	Hosts       []string `help:"Hosts to build with --flake." sep:","`
	PushTo      string   `help:"Binary cache to copy built closures to (nix copy --to), e.g. s3://... or file:///srv/cache." placeholder:"URL"`
	Substituter string   `help:"Binary cache devices fetch from (their nix.conf must trust its key)." placeholder:"URL"`
	Action      string   `help:"How devices activate it: switch (default), boot or test; overrides --file."`
	Description string   `help:"Free text shown in release ls."`
	// The fleet's own cache (fleet-admin cache), read by devices over NATS.
	Push       bool `help:"Push the closures into the fleet's binary cache (only what it lacks) and have devices fetch from it over NATS."`
	FleetCache bool `help:"Have devices fetch from the fleet's binary cache over NATS (the closures are there already: fleet-admin cache push)."`
	PushOpts   `prefix:"push-"`
	// Checks before the release is recorded.
	NoCheck  bool     `help:"Do not look the store paths up in the release's cache before recording it."`
	SignedBy []string `help:"Binary cache key names (as in trusted-public-keys, e.g. cache.example.org-1) the paths should be signed by; others are warned about." sep:"," placeholder:"NAME"`
}

// Run builds (with --flake), signs and records a release.
func (cmd *ReleaseCreateCmd) Run(g *Globals) error {
	rel := model.Release{}
	if cmd.File != "" {
		b, err := os.ReadFile(cmd.File)
		if err != nil {
			return fmt.Errorf("read --file: %w", err)
		}
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields() // a misspelt key would silently drop a setting
		if err := dec.Decode(&rel); err != nil {
			return fmt.Errorf("--file %s is not release JSON (keys: closures, default, substituter, action, description, id): %w", cmd.File, err)
		}
		if rel.ID != "" && cmd.Name != "" && rel.ID != cmd.Name {
			return fmt.Errorf("--file %s names release %q but --name says %q: give one", cmd.File, rel.ID, cmd.Name)
		}
	}
	if rel.Closures == nil {
		rel.Closures = map[string]string{}
	}
	for _, c := range cmd.Closure {
		host, path, ok := strings.Cut(c, "=")
		if !ok {
			return fmt.Errorf("--closure %q: want HOST=/nix/store/...", c)
		}
		rel.Closures[host] = path
	}
	if cmd.Flake != "" {
		built, err := BuildFlakeHosts(g.ctx, cmd.Flake, cmd.Hosts, g.stderr)
		if err != nil {
			return err
		}
		paths := make([]string, 0, len(built))
		for h, p := range built {
			rel.Closures[h] = p
			paths = append(paths, p)
		}
		slices.Sort(paths)
		if cmd.PushTo != "" {
			if err := PushClosures(g.ctx, cmd.PushTo, paths, g.stderr); err != nil {
				return err
			}
		}
	} else if len(cmd.Hosts) > 0 || cmd.PushTo != "" {
		return fmt.Errorf("--hosts and --push-to go with --flake")
	}
	if cmd.Default != "" {
		rel.Default = cmd.Default
	}
	if cmd.Substituter != "" {
		rel.Substituter = cmd.Substituter
	}
	if cmd.Description != "" {
		rel.Description = cmd.Description
	}
	if cmd.Action != "" {
		rel.Action = model.Action(cmd.Action)
	}
	if cmd.Push || cmd.FleetCache {
		rel.FleetCache = true
	}
	if rel.Action == "" {
		rel.Action = model.ActionSwitch
	}
	now := time.Now().UTC()
	if cmd.Name != "" {
		rel.ID = cmd.Name
	}
	if rel.ID == "" {
		var b [3]byte
		_, _ = rand.Read(b[:])
		rel.ID = fmt.Sprintf("rel-%s-%x", now.Format("20060102-150405"), b)
	}
	rel.Name = rel.ID
	rel.CreatedAt = now
	if err := rel.Validate(); err != nil {
		return err
	}
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	if cmd.Push {
		res, err := PushToFleetCache(g.ctx, c, releasePaths(&rel), cmd.PushOpts, g.progress())
		if err != nil {
			return err
		}
		fmt.Fprintf(g.stderr, "fleet cache: %s in the closures, %d pushed (%s), %d there already\n",
			plural(res.Paths, "store path", "store paths"), res.Pushed, byteText(res.Bytes), res.Present)
	}
	if !cmd.NoCheck {
		if err := checkRelease(g.ctx, c, &rel, cmd.SignedBy, g.stderr); err != nil {
			return err
		}
	}
	rel.Author = c.Key()
	signed, err := model.Sign(c.creds.Key, model.PurposeRelease, rel)
	if err != nil {
		return err
	}
	var out model.ReleaseView
	if err := c.Call(g.ctx, subjects.VerbReleaseCreate, true, signed, &out); err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(out)
	}
	_, err = fmt.Fprintln(g.stdout, out.ID)
	return err
}

// ReleaseLsCmd is `fleet-admin release ls`.
type ReleaseLsCmd struct{}

// Run lists releases.
func (ReleaseLsCmd) Run(g *Globals) error {
	return printList(g, func(c *Client) ([]model.Release, error) {
		rs, err := c.Releases(g.ctx)
		slices.SortStableFunc(rs, func(a, b model.Release) int {
			return cmp.Or(a.CreatedAt.Compare(b.CreatedAt), strings.Compare(a.ID, b.ID))
		})
		return rs, err
	}, "ID\tCREATED\tHOSTS\tDEFAULT\tACTION\tDESCRIPTION", func(r model.Release) string {
		def := "-"
		if r.Default != "" {
			def = shortPath(r.Default)
		}
		return fmt.Sprintf("%s\t%s\t%d\t%s\t%s\t%s", r.ID, localTime(r.CreatedAt), len(r.Closures), def, r.Action, orDash(r.Description))
	})
}

// ReleaseShowCmd is `fleet-admin release show`.
type ReleaseShowCmd struct {
	ID string `arg:"" help:"Release id."`
}

// Run shows one release.
func (cmd *ReleaseShowCmd) Run(g *Globals) error {
	var v model.ReleaseView
	if err := g.call(subjects.VerbRelease, false, model.ReleaseRef{ID: cmd.ID}, &v); err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(v)
	}
	tw := newTable(g.stdout)
	fmt.Fprintf(tw, "id:\t%s\n", v.ID)
	fmt.Fprintf(tw, "created:\t%s\n", localTime(v.CreatedAt))
	fmt.Fprintf(tw, "author:\t%s\n", v.Author)
	fmt.Fprintf(tw, "action:\t%s\n", v.Action)
	if v.FleetCache {
		fmt.Fprintf(tw, "fleet cache:\tyes (over NATS)\n")
	}
	if v.Substituter != "" {
		fmt.Fprintf(tw, "substituter:\t%s\n", v.Substituter)
	}
	if v.Description != "" {
		fmt.Fprintf(tw, "description:\t%s\n", v.Description)
	}
	if v.Default != "" {
		fmt.Fprintf(tw, "default:\t%s\n", v.Default)
	}
	for _, h := range v.Hosts() {
		fmt.Fprintf(tw, "host %s:\t%s\n", h, v.Closures[h])
	}
	return tw.Flush()
}

// ReleaseDiffCmd is `fleet-admin release diff`.
type ReleaseDiffCmd struct {
	A string `arg:"" help:"Older release id."`
	B string `arg:"" help:"Newer release id."`
}

// Run compares two releases.
func (cmd *ReleaseDiffCmd) Run(g *Globals) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	var a, b model.ReleaseView
	if err := c.Call(g.ctx, subjects.VerbRelease, false, model.ReleaseRef{ID: cmd.A}, &a); err != nil {
		return err
	}
	if err := c.Call(g.ctx, subjects.VerbRelease, false, model.ReleaseRef{ID: cmd.B}, &b); err != nil {
		return err
	}
	d := DiffReleases(&a.Release, &b.Release)
	if g.JSON {
		return g.printJSON(d)
	}
	for _, h := range d.Added {
		fmt.Fprintf(g.stdout, "+ %s\t%s\n", h.Host, h.To)
	}
	for _, h := range d.Removed {
		fmt.Fprintf(g.stdout, "- %s\t%s\n", h.Host, h.From)
	}
	for _, h := range d.Changed {
		fmt.Fprintf(g.stdout, "~ %s\t%s -> %s\n", h.Host, h.From, h.To)
	}
	if d.Default != nil {
		fmt.Fprintf(g.stdout, "~ (default)\t%s -> %s\n", orDash(d.Default.From), orDash(d.Default.To))
	}
	if len(d.Added)+len(d.Removed)+len(d.Changed) == 0 && d.Default == nil {
		fmt.Fprintln(g.stdout, "no differences")
	}
	return nil
}

// shortPath shortens /nix/store/<hash>-name to <hash[:7]>-name.
func shortPath(p string) string {
	base := strings.TrimPrefix(p, "/nix/store/")
	if len(base) > 33 && base[32] == '-' {
		return base[:7] + "…" + base[32:]
	}
	return base
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
