package admin

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"time"

	"fleet/model"
	"fleet/subjects"
)

// DevicesCmd is `fleet-admin devices`.
type DevicesCmd struct {
	Ls        DevicesLsCmd        `cmd:"" help:"List devices."`
	Show      DevicesShowCmd      `cmd:"" help:"Show one device."`
	Approve   DevicesApproveCmd   `cmd:"" help:"Approve a pending device."`
	Revoke    DevicesRevokeCmd    `cmd:"" help:"Revoke a device: disconnected at once and refused from then on."`
	SetGroups DevicesSetGroupsCmd `cmd:"" name:"set-groups" help:"Replace a device's groups; it converges to its new group's target release."`
	Pin       DevicesPinCmd       `cmd:"" help:"Hold a device on a release, whatever its groups' targets."`
	Unpin     DevicesUnpinCmd     `cmd:"" help:"Let a pinned device follow its groups' target again."`
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
	if d.Hostname != "" && d.Hostname != d.Name {
		fmt.Fprintf(tw, "host name:\t%s (another device enrolled with it first; releases map this host name)\n", d.Hostname)
	}
	fmt.Fprintf(tw, "groups:\t%s\n", strings.Join(d.Groups, ","))
	fmt.Fprintf(tw, "status:\t%s\n", d.Status)
	if d.Pin != nil {
		fmt.Fprintf(tw, "pinned:\t%s (since %s, by %s)\n", d.Pin.ReleaseID, localTime(d.Pin.At), orDash(d.Pin.By))
	}
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
	Groups []string `arg:"" help:"New groups, comma- or space-separated."`
}

// Run sets the groups.
func (cmd *DevicesSetGroupsCmd) Run(g *Globals) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	// The signed request names the device by its full ID: the device
	// checks it when it takes its new group's target.
	d, err := c.Device(g.ctx, cmd.Device)
	if err != nil {
		return err
	}
	// "a,b" and "a b" both name two groups (kong does not split
	// positional lists).
	var groups []string
	for _, arg := range cmd.Groups {
		for _, gr := range strings.Split(arg, ",") {
			if gr = strings.TrimSpace(gr); gr != "" {
				groups = append(groups, gr)
			}
		}
	}
	if d, err = c.SetDeviceGroups(g.ctx, d.ID, groups); err != nil {
		return err
	}
	return printDevice(g, d)
}

// DevicesPinCmd is `fleet-admin devices pin`.
type DevicesPinCmd struct {
	Device  string `arg:"" help:"Device ID, unique ID prefix or host name."`
	Release string `help:"Release to hold the device on (it is deployed to the device if it runs another)." required:""`
}

// Run pins the device.
func (cmd *DevicesPinCmd) Run(g *Globals) error { return pinDevice(g, cmd.Device, cmd.Release) }

// DevicesUnpinCmd is `fleet-admin devices unpin`.
type DevicesUnpinCmd struct {
	Device string `arg:"" help:"Device ID, unique ID prefix or host name."`
}

// Run unpins the device.
func (cmd *DevicesUnpinCmd) Run(g *Globals) error { return pinDevice(g, cmd.Device, "") }

// pinDevice pins ref on release ("" unpins). The signed request names the
// device by its full ID, because the device takes it as its deploy.
func pinDevice(g *Globals, ref, release string) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	d, err := c.Device(g.ctx, ref)
	if err != nil {
		return err
	}
	var out model.DeviceView
	if err := c.Call(g.ctx, subjects.VerbDevicePin, true, model.DevicePin{Ref: d.ID, ReleaseID: release}, &out); err != nil {
		return err
	}
	if !g.JSON {
		if release != "" {
			fmt.Fprintf(g.stderr, "%s is pinned to %s; it converges there within seconds (follow it with fleet-admin status)\n", out.Name, release)
		} else {
			fmt.Fprintf(g.stderr, "%s follows its groups again (%s)\n", out.Name, orDash(strings.Join(out.Groups, ",")))
		}
	}
	return printDevice(g, &out)
}
