package admin

import (
	"context"
	"errors"
	"fmt"
	"time"

	"fleet/model"
	"fleet/subjects"
)

// CmdCmd is `fleet-admin cmd`.
type CmdCmd struct {
	Device []string `help:"Device ID, unique ID prefix or host name (repeatable)." xor:"target" required:""`
	Group  string   `help:"Every device of this group." xor:"target" required:""`
	Action string   `arg:"" help:"reboot, rollback, refresh-facts or apply-now." enum:"reboot,rollback,refresh-facts,apply-now"`
	Wait   bool     `help:"Wait for each device's result, not only its acceptance."`
}

// Run signs one command per device and prints each device's result.
// Offline devices are reported as not reached: nothing is queued.
func (cmd *CmdCmd) Run(g *Globals) error {
	action, err := model.ParseCommandAction(cmd.Action)
	if err != nil {
		return err
	}
	var res []model.CommandResult
	err = g.withClient(func(c *Client) error {
		ids, err := c.commandTargets(g.ctx, cmd.Device, cmd.Group)
		if err != nil {
			return err
		}
		res, err = c.Command(g.ctx, ids, action, cmd.Wait)
		return err
	})
	if err != nil {
		return err
	}
	if g.JSON {
		if err := g.printJSON(res); err != nil {
			return err
		}
	} else {
		tw := newTable(g.stdout)
		fmt.Fprintln(tw, "NAME\tDEVICE\tCOMMAND\tRESULT\tDETAIL")
		for _, r := range res {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.Name, r.Device, r.Action, r.State, orDash(r.Error))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	failed := 0
	for _, r := range res {
		if !r.OK() {
			failed++
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d devices did not take the command", failed, len(res))
	}
	return nil
}

// commandTargets resolves --device refs or --group to device IDs.
func (c *Client) commandTargets(ctx context.Context, refs []string, group string) ([]string, error) {
	var ids []string
	if group != "" {
		devs, err := c.Devices(ctx, group)
		if err != nil {
			return nil, err
		}
		for _, d := range devs {
			ids = append(ids, d.ID)
		}
		if len(ids) == 0 {
			return nil, fmt.Errorf("group %s has no devices", group)
		}
		return ids, nil
	}
	for _, ref := range refs {
		d, err := c.Device(ctx, ref)
		if err != nil {
			return nil, err
		}
		ids = append(ids, d.ID)
	}
	if len(ids) == 0 {
		return nil, errors.New("name a device (--device) or a group (--group)")
	}
	return ids, nil
}

// Command signs action for each device (bound to its ID, fresh, with a
// new ID) and sends them in one request; the reply has each device's
// result.
func (c *Client) Command(ctx context.Context, devices []string, action model.CommandAction, wait bool) ([]model.CommandResult, error) {
	req := model.CommandRequest{Wait: wait}
	now := time.Now()
	for _, id := range devices {
		s, err := model.SignCommand(c.creds.Key, id, action, now)
		if err != nil {
			return nil, err
		}
		req.Commands = append(req.Commands, s)
	}
	var out []model.CommandResult
	return out, c.Call(ctx, subjects.VerbCommand, true, req, &out)
}
