package admin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"fleet/model"
)

// Before a release is recorded, each of its store paths is looked up in
// the cache its devices will fetch from: a path no cache has would fail on
// every device. A path signed by none of the keys named with --signed-by
// (or by none at all) is worth a warning: devices trust their own
// trusted-public-keys, which fleet-admin cannot see.

// releasePaths are the release's store paths, sorted, each once.
func releasePaths(rel *model.Release) []string {
	var out []string
	for _, p := range rel.Closures {
		out = append(out, p)
	}
	if rel.Default != "" {
		out = append(out, rel.Default)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// maxCheckPaths bounds the store paths a check follows through a cache's
// references.
const maxCheckPaths = 20000

// checkRelease looks each of the release's store paths (and what they
// reference) up in its cache: refused when one is missing, a warning on
// warn when one is not signed by a key of signedBy.
func checkRelease(ctx context.Context, c *Client, rel *model.Release, signedBy []string, warn io.Writer) error {
	paths := releasePaths(rel)
	var sigs map[string][]string
	var where string
	var err error
	switch {
	case rel.FleetCache:
		where = "the fleet cache"
		// The closure when this machine has it, else the top-level paths
		// (the cache holds nothing without what it references: a push
		// sends whole closures).
		all := paths
		if cl, err := closurePaths(ctx, paths); err == nil {
			all = cl
		}
		if sigs, err = CacheSigners(ctx, c, all); err != nil {
			return err
		}
		paths = all
	case rel.Substituter != "":
		where = rel.Substituter
		if sigs, paths, err = substituterSigners(ctx, rel.Substituter, paths); err != nil {
			if errors.Is(err, errCannotCheck) {
				fmt.Fprintf(warn, "warning: %v: the release's paths were not checked\n", err)
				return nil
			}
			return err
		}
	default:
		// The devices' own substituters: nothing here to ask.
		return nil
	}
	var missing []string
	for _, p := range paths {
		keys, ok := sigs[p]
		switch {
		case !ok:
			missing = append(missing, p)
		case len(keys) == 0:
			fmt.Fprintf(warn, "warning: %s is not signed in %s: devices will refuse it\n", p, where)
		case len(signedBy) > 0 && !slices.ContainsFunc(keys, func(k string) bool { return slices.Contains(signedBy, k) }):
			fmt.Fprintf(warn, "warning: %s is signed by %s in %s, not by %s\n", p, strings.Join(keys, ", "), where, strings.Join(signedBy, ", "))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s not in %s (first: %s): push them (--push, fleet-admin cache push, or --push-to), or pass --no-check",
			plural(len(missing), "store path is", "store paths are"), where, missing[0])
	}
	return nil
}

var errCannotCheck = errors.New("cannot look paths up")

// substituterSigners reads the narinfos of paths and of everything they
// reference from an http(s):// or file:// binary cache: the signing keys
// of each path found, and every path looked at.
func substituterSigners(ctx context.Context, sub string, paths []string) (map[string][]string, []string, error) {
	u, err := url.Parse(sub)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https" && u.Scheme != "file") {
		return nil, nil, fmt.Errorf("%w in %s (only http, https and file caches are checked)", errCannotCheck, sub)
	}
	client := &http.Client{Timeout: 30 * time.Second}
	get := func(hash string) ([]byte, bool, error) {
		if u.Scheme == "file" {
			b, err := os.ReadFile(filepath.Join(u.Path, hash+".narinfo"))
			if errors.Is(err, os.ErrNotExist) {
				return nil, false, nil
			}
			return b, err == nil, err
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(sub, "/")+"/"+hash+".narinfo", nil)
		if err != nil {
			return nil, false, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return nil, false, fmt.Errorf("check %s: %w", sub, err)
		}
		defer resp.Body.Close()
		switch {
		case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusForbidden:
			return nil, false, nil
		case resp.StatusCode != http.StatusOK:
			return nil, false, fmt.Errorf("check %s: %s for %s.narinfo", sub, resp.Status, hash)
		}
		b, err := io.ReadAll(io.LimitReader(resp.Body, model.MaxNarInfoBytes+1))
		return b, err == nil, err
	}
	sigs := map[string][]string{}
	seen := map[string]bool{}
	queue := append([]string(nil), paths...)
	var all []string
	for len(queue) > 0 && len(all) < maxCheckPaths {
		p := queue[0]
		queue = queue[1:]
		if seen[p] {
			continue
		}
		seen[p] = true
		all = append(all, p)
		b, ok, err := get(storeHash(p))
		if err != nil {
			return nil, nil, err
		}
		if !ok {
			continue
		}
		ni, err := model.ParseNarInfo(b)
		if err != nil {
			// A narinfo fleet cannot read may still be fine for Nix.
			sigs[p] = []string{"?"}
			continue
		}
		sigs[p] = ni.SigKeys()
		for _, r := range ni.References {
			queue = append(queue, "/nix/store/"+r)
		}
	}
	return sigs, all, nil
}
