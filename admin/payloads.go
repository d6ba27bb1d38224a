package admin

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"fleet/model"
	"fleet/subjects"
)

// PayloadCmd is `fleet-admin payload`.
type PayloadCmd struct {
	Push PayloadPushCmd `cmd:"" help:"Seal a file to each device's key and deliver it."`
	Rm   PayloadRmCmd   `cmd:"" help:"Withdraw a payload: the devices remove the file."`
	Ls   PayloadLsCmd   `cmd:"" help:"Payloads, each device's delivery state and certificate expiry."`
}

// PayloadPushCmd is `fleet-admin payload push`.
type PayloadPushCmd struct {
	Device    []string `help:"Device ID, unique ID prefix or host name (repeatable)." xor:"target" required:""`
	Group     string   `help:"Every device of this group." xor:"target" required:""`
	Name      string   `help:"File name under the agent's payload dir (e.g. wifi-cert)." required:""`
	File      string   `help:"The file to deliver (at most 64 KiB)." required:"" type:"existingfile"`
	Mode      string   `help:"Permission bits of the delivered file (octal)." default:"0400"`
	Owner     string   `help:"User that owns the delivered file (default: the agent's)."`
	FileGroup string   `help:"Group that owns the delivered file (default: the owner's)."`
	Reload    string   `help:"systemd unit to reload (or restart) once the file landed."`
}

// Run seals the file to each device and pushes it.
func (cmd *PayloadPushCmd) Run(g *Globals) error {
	mode, err := strconv.ParseUint(cmd.Mode, 8, 32)
	if err != nil || mode&^0o7777 != 0 {
		return fmt.Errorf("--mode %q is not an octal permission mode like 0400", cmd.Mode)
	}
	if err := model.CheckPayloadName(cmd.Name); err != nil {
		return fmt.Errorf("--name: %w", err)
	}
	data, err := os.ReadFile(cmd.File)
	if err != nil {
		return err
	}
	if len(data) > model.MaxPayloadBytes {
		return fmt.Errorf("--file %s is %d bytes, more than the %d bytes a payload may hold: nothing pushed", cmd.File, len(data), model.MaxPayloadBytes)
	}
	tmpl := model.Payload{Name: cmd.Name, Mode: uint32(mode), Owner: cmd.Owner, Group: cmd.FileGroup, Reload: cmd.Reload, NotAfter: certNotAfter(data)}
	var out []model.PayloadView
	err = g.withClient(func(c *Client) error {
		devs, err := c.targetDevices(g.ctx, cmd.Device, cmd.Group)
		if err != nil {
			return err
		}
		out, err = c.PushPayload(g.ctx, devs, tmpl, data)
		return err
	})
	if err != nil {
		return err
	}
	return printPayloads(g, out)
}

// certNotAfter is the expiry of the first certificate in PEM data (zero
// when there is none).
func certNotAfter(data []byte) time.Time {
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return time.Time{}
		}
		if b.Type == "CERTIFICATE" {
			if c, err := x509.ParseCertificate(b.Bytes); err == nil {
				return c.NotAfter.UTC()
			}
		}
	}
}

// targetDevices resolves --device refs or --group to device records.
func (c *Client) targetDevices(ctx context.Context, refs []string, group string) ([]model.DeviceView, error) {
	if group != "" {
		devs, err := c.Devices(ctx, group)
		if err != nil {
			return nil, err
		}
		if len(devs) == 0 {
			return nil, fmt.Errorf("group %s has no devices", group)
		}
		return devs, nil
	}
	var out []model.DeviceView
	for _, ref := range refs {
		d, err := c.Device(ctx, ref)
		if err != nil {
			return nil, err
		}
		out = append(out, *d)
	}
	if len(out) == 0 {
		return nil, errors.New("name a device (--device) or a group (--group)")
	}
	return out, nil
}

// PushPayload seals data to each device's xkey (the coordinator never
// sees it), signs each and pushes them in one request.
func (c *Client) PushPayload(ctx context.Context, devs []model.DeviceView, tmpl model.Payload, data []byte) ([]model.PayloadView, error) {
	var req model.PayloadPush
	now := time.Now()
	for _, d := range devs {
		if d.Status == model.DeviceRevoked {
			continue
		}
		p := tmpl
		p.Device = d.ID
		s, err := model.SealPayload(c.creds.Key, d.XKey, p, data, now)
		if err != nil {
			return nil, fmt.Errorf("%s (%s): %w", d.Name, d.ID, err)
		}
		req.Payloads = append(req.Payloads, s)
	}
	if len(req.Payloads) == 0 {
		return nil, errors.New("no device to push to (revoked devices get no payloads)")
	}
	var out []model.PayloadView
	return out, c.Call(ctx, subjects.VerbPayloadPush, true, req, &out)
}

// PayloadRmCmd is `fleet-admin payload rm`.
type PayloadRmCmd struct {
	Name   string   `arg:"" help:"Payload name."`
	Device []string `help:"Only from these devices (ID, ID prefix or host name; repeatable); default: every device."`
}

// Run withdraws the payload.
func (cmd *PayloadRmCmd) Run(g *Globals) error {
	var out []model.PayloadView
	err := g.withClient(func(c *Client) error {
		var ids []string
		for _, ref := range cmd.Device {
			d, err := c.Device(g.ctx, ref)
			if err != nil {
				return err
			}
			ids = append(ids, d.ID)
		}
		return c.Call(g.ctx, subjects.VerbPayloadRemove, true, model.PayloadRemove{Name: cmd.Name, Devices: ids}, &out)
	})
	if err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(out)
	}
	for _, v := range out {
		fmt.Fprintf(g.stdout, "withdrew %s from %s (%s)\n", v.Name, v.DeviceName, v.Device)
	}
	return nil
}

// PayloadLsCmd is `fleet-admin payload ls`.
type PayloadLsCmd struct {
	Name  string `help:"Only this payload."`
	Group string `help:"Only devices of this group."`
}

// Run lists payloads per device.
func (cmd *PayloadLsCmd) Run(g *Globals) error {
	var out []model.PayloadView
	if err := g.call(subjects.VerbPayloads, false, model.PayloadQuery{Name: cmd.Name, Group: cmd.Group}, &out); err != nil {
		return err
	}
	return printPayloads(g, out)
}

func printPayloads(g *Globals, out []model.PayloadView) error {
	if g.JSON {
		return g.printJSON(out)
	}
	tw := newTable(g.stdout)
	fmt.Fprintln(tw, "DEVICE\tPAYLOAD\tSTATE\tSHA256\tMODE\tOWNER\tEXPIRES\tPUSHED\tERROR")
	for _, v := range out {
		exp := "-"
		if !v.NotAfter.IsZero() {
			exp = v.NotAfter.Local().Format(time.DateOnly)
			if d := time.Until(v.NotAfter); d < 0 {
				exp += " (expired)"
			} else {
				exp += fmt.Sprintf(" (%dd)", int(d.Hours()/24))
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%.12s\t%04o\t%s\t%s\t%s\t%s\n", orDash(v.DeviceName), v.Name, v.State, v.SHA256, v.Mode,
			orDash(v.Owner), exp, v.PushedAt.Local().Format(time.DateTime), orDash(v.Error))
	}
	return tw.Flush()
}
