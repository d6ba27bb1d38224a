package admin

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"time"

	"fleet/model"
)

// DevicesCmd is `fleet-admin devices`.
type DevicesCmd struct {
	Ls        DevicesLsCmd        `cmd:"" help:"List devices."`
	Show      DevicesShowCmd      `cmd:"" help:"Show one device."`
	Approve   DevicesApproveCmd   `cmd:"" help:"Approve a pending device."`
	Revoke    DevicesRevokeCmd    `cmd:"" help:"Revoke a device: disconnected at once and refused from then on."`
	SetGroups DevicesSetGroupsCmd `cmd:"" name:"set-groups" help:"Replace a device's groups."`
}

// DevicesLsCmd is `fleet-admin devices ls`.
type DevicesLsCmd struct {
	Group string `help:"Only devices of this group."`
}

// Run lists devices by name (a short ID in the table; the full one with
// --json or devices show). A group that no device is in is named as an
// error, with the groups whose names are near it.
func (cmd *DevicesLsCmd) Run(g *Globals) error {
	return printList(g, func(c *Client) ([]model.DeviceView, error) {
		ds, err := c.Devices(g.ctx, cmd.Group)
		if err == nil && len(ds) == 0 && cmd.Group != "" {
			err = checkGroup(g, c, cmd.Group)
		}
		slices.SortStableFunc(ds, func(a, b model.DeviceView) int {
			return cmp.Or(strings.Compare(a.Name, b.Name), strings.Compare(a.ID, b.ID))
		})
		return ds, err
	}, "NAME\tID\tGROUPS\tSTATUS\tONLINE\tLAST SEEN", func(d model.DeviceView) string {
		return fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s", d.Name, shortID(d.ID), orDash(strings.Join(d.Groups, ",")), d.Status, yesNo(d.Online), ago(d.LastSeen))
	})
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func seen(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return ago(t) + " (" + localTime(t) + ")"
}

// printDevice prints one device as JSON or as aligned fields.
func printDevice(g *Globals, d *model.DeviceView) error {
	if g.JSON {
		return g.printJSON(d)
	}
	tw := newTable(g.stdout)
	fmt.Fprintf(tw, "id:\t%s\n", d.ID)
	fmt.Fprintf(tw, "name:\t%s\n", d.Name)
	fmt.Fprintf(tw, "groups:\t%s\n", strings.Join(d.Groups, ","))
	fmt.Fprintf(tw, "status:\t%s\n", d.Status)
	fmt.Fprintf(tw, "online:\t%s\n", yesNo(d.Online))
	fmt.Fprintf(tw, "last seen:\t%s\n", seen(d.LastSeen))
	fmt.Fprintf(tw, "xkey:\t%s\n", d.XKey)
	fmt.Fprintf(tw, "enrolled:\t%s (token %s)\n", localTime(d.EnrolledAt), d.TokenID)
	if !d.RevokedAt.IsZero() {
		fmt.Fprintf(tw, "revoked:\t%s\n", localTime(d.RevokedAt))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if d.Facts != nil {
		printFacts(g.stdout, d.Facts)
	}
	return nil
}

// DevicesShowCmd is `fleet-admin devices show`.
type DevicesShowCmd struct {
	Device string `arg:"" help:"Device ID, unique ID prefix or host name."`
}

// Run shows the device.
func (cmd *DevicesShowCmd) Run(g *Globals) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	d, err := c.Device(g.ctx, cmd.Device)
	if err != nil {
		return err
	}
	return printDevice(g, d)
}

// DevicesApproveCmd is `fleet-admin devices approve`.
type DevicesApproveCmd struct {
	Device string `arg:"" help:"Device ID, unique ID prefix or host name."`
}

// Run approves the device.
func (cmd *DevicesApproveCmd) Run(g *Globals) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	d, err := c.ApproveDevice(g.ctx, cmd.Device)
	if err != nil {
		return err
	}
	return printDevice(g, d)
}

// DevicesRevokeCmd is `fleet-admin devices revoke`.
type DevicesRevokeCmd struct {
	Device string `arg:"" help:"Device ID, unique ID prefix or host name."`
}

// Run revokes the device, once confirmed.
func (cmd *DevicesRevokeCmd) Run(g *Globals) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	// Name the device the reference resolves to before asking.
	d, err := c.Device(g.ctx, cmd.Device)
	if err != nil {
		return err
	}
	if err := g.confirm(fmt.Sprintf("revoke device %s (%s)? It is disconnected at once and can never connect again", d.Name, d.ID)); err != nil {
		return err
	}
	d, err = c.RevokeDevice(g.ctx, d.ID)
	if err != nil {
		return err
	}
	return printDevice(g, d)
}

// DevicesSetGroupsCmd is `fleet-admin devices set-groups`.
type DevicesSetGroupsCmd struct {
	Device string   `arg:"" help:"Device ID, unique ID prefix or host name."`
	Groups []string `arg:"" help:"New groups, comma-separated." sep:","`
}

// Run sets the groups.
func (cmd *DevicesSetGroupsCmd) Run(g *Globals) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	d, err := c.SetDeviceGroups(g.ctx, cmd.Device, cmd.Groups)
	if err != nil {
		return err
	}
	return printDevice(g, d)
}
