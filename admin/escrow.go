package admin

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/nats-io/nkeys"

	"fleet/accounts"
	"fleet/model"
	"fleet/subjects"
)

// EscrowCmd is `fleet-admin escrow`.
type EscrowCmd struct {
	Init   EscrowInitCmd   `cmd:"" help:"Create the organisation's escrow key pair; only its public half goes to the coordinator and the devices."`
	Rotate EscrowRotateCmd `cmd:"" help:"Create a new escrow key pair; devices re-seal their recovery keys to it."`
	Get    EscrowGetCmd    `cmd:"" help:"Open a device's escrowed recovery keys with the escrow key pair (audited)."`
	Ls     EscrowLsCmd     `cmd:"" help:"Escrow state per device and disk: when each key was escrowed and last confirmed."`
}

// EscrowInitCmd is `fleet-admin escrow init`.
type EscrowInitCmd struct {
	Out string `help:"File for the escrow key pair's seed (0600): keep it offline." required:"" type:"path"`
}

// Run creates the key pair and records its public half.
func (cmd *EscrowInitCmd) Run(g *Globals) error { return newEscrowKey(g, cmd.Out, false) }

// EscrowRotateCmd is `fleet-admin escrow rotate`.
type EscrowRotateCmd struct {
	Out string `help:"File for the new escrow key pair's seed (0600). Keep the old one until escrow ls shows no stale_key." required:"" type:"path"`
}

// Run creates a new key pair and records its public half.
func (cmd *EscrowRotateCmd) Run(g *Globals) error { return newEscrowKey(g, cmd.Out, true) }

func newEscrowKey(g *Globals, out string, rotate bool) error {
	if _, err := os.Stat(out); err == nil {
		return fmt.Errorf("--out %s exists: escrow keys are never overwritten (choose another file)", out)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	kp, err := nkeys.CreateCurveKeys()
	if err != nil {
		return err
	}
	pub, _ := kp.PublicKey()
	return g.withClient(func(c *Client) error {
		if !rotate {
			var cur []model.EscrowView
			if err := c.Call(g.ctx, subjects.VerbEscrow, false, nil, &cur); err == nil {
				for _, v := range cur {
					if v.EscrowKey != "" {
						return errors.New("an escrow key exists already: use fleet-admin escrow rotate")
					}
				}
			}
		}
		// The seed is on disk before the public half is used: no key is
		// ever escrowed to a pair nobody holds.
		if err := accounts.WriteSeed(out, kp); err != nil {
			return err
		}
		st, err := model.Sign(c.creds.Key, model.PurposeEscrowKey, model.EscrowKey{Key: pub, Time: time.Now().UTC()})
		if err != nil {
			return err
		}
		if err := c.Call(g.ctx, subjects.VerbEscrowKey, true, st, nil); err != nil {
			return fmt.Errorf("%w (the new key pair is in %s, unused)", err, out)
		}
		if g.JSON {
			return g.printJSON(map[string]string{"escrow_key": pub, "seed_file": out})
		}
		fmt.Fprintf(g.stdout, "escrow key %s\nits seed is in %s: keep it offline, it opens every escrowed recovery key\n", pub, out)
		return nil
	})
}

// EscrowGetCmd is `fleet-admin escrow get`.
type EscrowGetCmd struct {
	Device string `arg:"" help:"Device ID, unique ID prefix or host name."`
	Key    string `help:"The escrow key pair's seed file (from escrow init or rotate)." required:"" type:"existingfile"`
	Disk   string `help:"Only this LUKS device."`
}

// Run fetches and opens the device's escrowed recovery keys.
func (cmd *EscrowGetCmd) Run(g *Globals) error {
	b, err := os.ReadFile(cmd.Key)
	if err != nil {
		return err
	}
	kp, err := nkeys.FromCurveSeed(bytes.TrimSpace(b))
	if err != nil {
		return fmt.Errorf("--key %s is not an escrow key pair's seed: %w", cmd.Key, err)
	}
	var recs []model.EscrowRecord
	if err := g.call(subjects.VerbEscrowGet, true, model.EscrowGet{Ref: cmd.Device, Disk: cmd.Disk}, &recs); err != nil {
		return err
	}
	type opened struct {
		Device      string    `json:"device"`
		Disk        string    `json:"disk"`
		RecoveryKey string    `json:"recovery_key,omitempty"`
		Error       string    `json:"error,omitempty"`
		EscrowedAt  time.Time `json:"escrowed_at"`
		ConfirmedAt time.Time `json:"confirmed_at"`
	}
	var out []opened
	failed := 0
	for _, r := range recs {
		var p model.EscrowPut
		if err := r.Signed.Decode(&p); err != nil {
			return err
		}
		o := opened{Device: p.Device, Disk: p.Disk, EscrowedAt: r.EscrowedAt, ConfirmedAt: r.ConfirmedAt}
		// Signed by the device itself: the coordinator did not make it up.
		if _, err := model.CheckEscrowPut(&r.Signed, p.Device); err != nil {
			o.Error = err.Error()
		} else if key, err := model.OpenRecoveryKey(&p, kp); err != nil {
			o.Error = err.Error()
		} else {
			o.RecoveryKey = string(key)
		}
		if o.Error != "" {
			failed++
		}
		out = append(out, o)
	}
	if g.JSON {
		if err := g.printJSON(out); err != nil {
			return err
		}
	} else {
		for _, o := range out {
			if o.Error != "" {
				fmt.Fprintf(g.stderr, "%s: %s\n", o.Disk, o.Error)
				continue
			}
			fmt.Fprintf(g.stdout, "%s\t%s\n", o.Disk, o.RecoveryKey)
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d recovery keys did not open", failed, len(out))
	}
	return nil
}

// EscrowLsCmd is `fleet-admin escrow ls`.
type EscrowLsCmd struct {
	Group string `help:"Only devices of this group."`
}

// Run lists the escrow state.
func (cmd *EscrowLsCmd) Run(g *Globals) error {
	var out []model.EscrowView
	if err := g.call(subjects.VerbEscrow, false, model.DeviceList{Group: cmd.Group}, &out); err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(out)
	}
	tw := newTable(g.stdout)
	fmt.Fprintln(tw, "DEVICE\tDISK\tSTATE\tESCROWED\tCONFIRMED")
	for _, v := range out {
		at := func(t time.Time) string {
			if t.IsZero() {
				return "-"
			}
			return t.Local().Format(time.DateTime)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", v.Name, v.Disk, v.State, at(v.EscrowedAt), at(v.ConfirmedAt))
	}
	return tw.Flush()
}
