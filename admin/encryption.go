package admin

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"fleet/model"
	"fleet/subjects"
)

// runMDM is status --unencrypted and --expiring: the devices whose root
// file system is not encrypted (or not known to be), and the payload
// certificates that expire soon.
func (cmd *StatusCmd) runMDM(g *Globals) error {
	var within time.Duration
	if cmd.Expiring != "" {
		var err error
		if within, err = parseDays(cmd.Expiring); err != nil {
			return fmt.Errorf("--expiring: %w", err)
		}
	}
	type report struct {
		Unencrypted []model.EncryptionView `json:"unencrypted,omitempty"`
		Expiring    []model.PayloadView    `json:"expiring,omitempty"`
	}
	var rep report
	err := g.withClient(func(c *Client) error {
		if cmd.Unencrypted {
			var all []model.EncryptionView
			if err := c.Call(g.ctx, subjects.VerbEncryption, false, model.DeviceList{Group: cmd.Group}, &all); err != nil {
				return err
			}
			rep.Unencrypted = []model.EncryptionView{}
			for _, v := range all {
				if !v.Encrypted() {
					rep.Unencrypted = append(rep.Unencrypted, v)
				}
			}
		}
		if cmd.Expiring != "" {
			var all []model.PayloadView
			if err := c.Call(g.ctx, subjects.VerbPayloads, false, model.PayloadQuery{Group: cmd.Group}, &all); err != nil {
				return err
			}
			rep.Expiring = []model.PayloadView{}
			for _, v := range all {
				if !v.NotAfter.IsZero() && time.Until(v.NotAfter) <= within {
					rep.Expiring = append(rep.Expiring, v)
				}
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(rep)
	}
	if cmd.Unencrypted {
		tw := newTable(g.stdout)
		fmt.Fprintln(tw, "NAME\tDEVICE\tONLINE\tROOT ENCRYPTED\tLUKS DEVICES")
		for _, v := range rep.Unencrypted {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", v.Name, v.Device, yesNo(v.Online),
				encrypted(model.Encryption{RootEncrypted: v.RootEncrypted}), orDash(strings.Join(v.LUKSDevices, ",")))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		fmt.Fprintf(g.stdout, "\n%d devices without an encrypted root file system\n", len(rep.Unencrypted))
	}
	if cmd.Expiring != "" {
		if cmd.Unencrypted {
			fmt.Fprintln(g.stdout)
		}
		if err := printPayloads(g, rep.Expiring); err != nil {
			return err
		}
		fmt.Fprintf(g.stdout, "\n%d payload certificates expire within %s\n", len(rep.Expiring), cmd.Expiring)
	}
	return nil
}

// parseDays parses a duration that may be given in days ("30d").
func parseDays(s string) (time.Duration, error) {
	if d, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.Atoi(d)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("%q is not a number of days like 30d", s)
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%q is not a duration like 30d or 72h", s)
	}
	return d, nil
}
