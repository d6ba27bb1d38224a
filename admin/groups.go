package admin

import (
	"fmt"
	"strings"

	"fleet/model"
	"fleet/subjects"
)

// GroupsCmd is `fleet-admin groups`.
type GroupsCmd struct {
	Ls   GroupsLsCmd   `cmd:"" help:"List groups: each one's target release and how its devices stand."`
	Show GroupsShowCmd `cmd:"" help:"Show a group's target and every device in it."`
}

// GroupsLsCmd is `fleet-admin groups ls`.
type GroupsLsCmd struct{}

// Run lists the groups.
func (GroupsLsCmd) Run(g *Globals) error {
	return printList(g, func(c *Client) ([]model.GroupRow, error) {
		var rows []model.GroupRow
		err := c.Call(g.ctx, subjects.VerbGroups, false, nil, &rows)
		return rows, err
	}, "GROUP\tTARGET\tSET\tDEVICES\tON TARGET\tBEHIND\tFAILING\tCONFLICTS\tPINNED", func(r model.GroupRow) string {
		set := "-"
		if !r.SetAt.IsZero() {
			set = localTime(r.SetAt)
		}
		return fmt.Sprintf("%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d", r.Group, orDash(r.ReleaseID), set, r.Devices,
			r.OnTarget, r.Behind, r.Failing, r.Conflicts, r.Pinned)
	})
}

// GroupsShowCmd is `fleet-admin groups show`.
type GroupsShowCmd struct {
	Group string `arg:"" help:"Group name."`
}

// Run shows one group.
func (cmd *GroupsShowCmd) Run(g *Globals) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	var v model.GroupView
	if err := c.Call(g.ctx, subjects.VerbGroup, false, model.GroupRef{Group: cmd.Group}, &v); err != nil {
		if isCode(err, model.CodeNotFound) {
			if cerr := checkGroup(g, c, cmd.Group); cerr != nil {
				return withCode(ExitError, cerr)
			}
		}
		return err
	}
	if g.JSON {
		return g.printJSON(v)
	}
	if v.ReleaseID != "" {
		fmt.Fprintf(g.stdout, "group %s: target %s (set %s by rollout %s)\n", v.Group, v.ReleaseID, localTime(v.SetAt), v.RolloutID)
	} else {
		fmt.Fprintf(g.stdout, "group %s: no target yet (a rollout to the whole group sets it when it succeeds)\n", v.Group)
	}
	fmt.Fprintf(g.stdout, "%s: %d on target, %d behind, %d failing, %s, %d pinned\n\n", plural(v.Devices, "device", "devices"),
		v.OnTarget, v.Behind, v.Failing, plural(v.Conflicts, "conflict", "conflicts"), v.Pinned)
	tw := newTable(g.stdout)
	fmt.Fprintln(tw, "DEVICE\tID\tSTATE\tCURRENT\tDESIRED RELEASE\tDETAIL")
	for _, m := range v.Members {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", m.Name, shortID(m.ID), m.State, orDash(shortPath(m.CurrentSystem)),
			orDash(m.DesiredRelease), strings.TrimSpace(m.Detail))
	}
	return tw.Flush()
}
