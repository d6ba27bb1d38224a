package admin

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/agnivade/levenshtein"
)

// checkGroup is called when a listing filtered by group found nothing: if
// no device at all is in that group, the group does not exist (groups are
// the devices' own), and the error names the groups near it, so a typo
// (--group develpers) is told apart from an empty result.
func checkGroup(g *Globals, c *Client, group string) error {
	ds, err := c.Devices(g.ctx, "")
	if err != nil {
		return err
	}
	known := map[string]bool{}
	for _, d := range ds {
		for _, gr := range d.Groups {
			known[gr] = true
		}
	}
	if known[group] {
		return nil
	}
	groups := make([]string, 0, len(known))
	for gr := range known {
		groups = append(groups, gr)
	}
	slices.Sort(groups)
	msg := fmt.Sprintf("group %q does not exist: no device is in it", group)
	if near := nearNames(group, groups); len(near) > 0 {
		msg += "; did you mean " + strings.Join(near, " or ") + "?"
	} else if len(groups) > 0 {
		if len(groups) > 10 {
			groups = append(groups[:10], "...")
		}
		msg += "; groups: " + strings.Join(groups, ", ")
	}
	return fmt.Errorf("%s", msg)
}

// nearNames are the names within a small edit distance of s (a third of
// its length, at least 2), nearest first, at most 5.
func nearNames(s string, names []string) []string {
	type cand struct {
		name string
		d    int
	}
	limit := max(2, len(s)/3)
	var cs []cand
	for _, n := range names {
		d := levenshtein.ComputeDistance(strings.ToLower(s), strings.ToLower(n))
		if d <= limit || strings.Contains(strings.ToLower(n), strings.ToLower(s)) {
			cs = append(cs, cand{n, d})
		}
	}
	slices.SortFunc(cs, func(a, b cand) int { return cmp.Or(cmp.Compare(a.d, b.d), strings.Compare(a.name, b.name)) })
	out := []string{}
	for _, c := range cs[:min(len(cs), 5)] {
		out = append(out, c.name)
	}
	return out
}
