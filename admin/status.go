package admin

import (
	"cmp"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/mattn/go-isatty"

	"fleet/model"
)

// StatusCmd is `fleet-admin status`.
type StatusCmd struct {
	Group    string        `help:"Only devices of this group."`
	Watch    bool          `help:"Refresh until interrupted (in place on a terminal)."`
	Interval time.Duration `help:"Refresh interval with --watch." default:"2s"`

	// MDM views (admin/encryption.go).
	Unencrypted bool   `help:"Only devices whose root file system is not encrypted (or not known to be)."`
	Expiring    string `help:"Only payload certificates that expire within this time (e.g. 30d, 72h)."`
}

// Run prints one line a device and a summary.
func (cmd *StatusCmd) Run(g *Globals) error {
	if cmd.Unencrypted || cmd.Expiring != "" {
		return cmd.runMDM(g)
	}
	if cmd.Interval <= 0 {
		return fmt.Errorf("--interval must be positive")
	}
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	tty := false
	if f, ok := g.stdout.(*os.File); ok {
		tty = isatty.IsTerminal(f.Fd())
	}
	for first := true; ; first = false {
		rep, err := c.Status(g.ctx, cmd.Group)
		if err != nil {
			return err
		}
		if first && len(rep.Devices) == 0 && cmd.Group != "" {
			if err := checkGroup(g, c, cmd.Group); err != nil {
				return err
			}
		}
		slices.SortStableFunc(rep.Devices, func(a, b model.DeviceStatusRow) int {
			return cmp.Or(strings.Compare(a.Name, b.Name), strings.Compare(a.ID, b.ID))
		})
		if cmd.Watch && tty && !g.JSON {
			fmt.Fprint(g.stdout, "\033[H\033[2J") // redraw in place
		}
		if g.JSON {
			if err := g.printJSON(rep); err != nil {
				return err
			}
		} else if err := printStatus(g.stdout, rep); err != nil {
			return err
		}
		if !cmd.Watch {
			return nil
		}
		select {
		case <-g.ctx.Done():
			return nil
		case <-time.After(cmd.Interval):
		}
	}
}

func printStatus(w io.Writer, rep *model.StatusReport) error {
	tw := newTable(w)
	fmt.Fprintln(tw, "NAME\tID\tONLINE\tLAST SEEN\tCURRENT\tDESIRED\tLAST RESULT\tDISK\tREBOOT\tROLLOUT\tNOTE")
	for _, r := range rep.Devices {
		health := orDash(string(r.LastResult))
		desired := "-"
		if r.DesiredSystem != "" {
			desired = shortPath(r.DesiredSystem)
			if r.DesiredSystem == r.CurrentSystem {
				desired = "(same)"
			}
		}
		reboot := "-"
		if r.RebootNeeded {
			reboot = "needed"
		}
		note := "-"
		switch {
		case r.Conflict != "":
			// Named so an admin sees why nothing is applied.
			note = "conflict: " + r.Conflict + " (pin it or fix its groups)"
		case r.Pinned != "":
			note = "pinned to " + r.Pinned
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.0f%%\t%s\t%s\t%s\n", r.Name, shortID(r.ID), yesNo(r.Online), ago(r.LastSeen),
			orDash(shortPath(r.CurrentSystem)), desired, health, r.DiskMaxUsedRatio*100, reboot, orDash(r.Rollout), note)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	s := rep.Summary
	scope := "fleet"
	if rep.Group != "" {
		scope = "group " + rep.Group
	}
	// The names are the JSON summary's: up_to_date, failing, pending
	// (a desired system on its way), awaiting_approval.
	_, err := fmt.Fprintf(w, "\n%s: %s, %d online, %d up to date, %d failing, %d pending, %d awaiting approval (at %s)\n",
		scope, plural(s.Total, "device", "devices"), s.Online, s.UpToDate, s.Failing, s.Pending, s.AwaitingApproval, localTime(rep.Time))
	return err
}

// FactsCmd is `fleet-admin facts`.
type FactsCmd struct {
	Device string `arg:"" help:"Device ID, ID prefix or host name."`
	Since  Since  `help:"How far back: 90m, 24h, 1d, 2w." default:"24h"`
}

// Run prints a device's fact reports, oldest first.
func (cmd *FactsCmd) Run(g *Globals) error {
	if cmd.Since <= 0 {
		return usageError(fmt.Errorf("--since must be a positive duration, e.g. 24h or 1d"))
	}
	var facts []model.Facts
	err := g.withClient(func(c *Client) (err error) {
		facts, err = c.Facts(g.ctx, cmd.Device, cmd.Since.D())
		return err
	})
	if err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(facts)
	}
	tw := newTable(g.stdout)
	fmt.Fprintln(tw, "TIME\tSYSTEM\tKERNEL\tUPTIME\tLOAD\tMEM AVAIL\tROOT ENCRYPTED\tLAST APPLY")
	for _, f := range facts {
		last := "-"
		if f.LastApply != nil {
			last = string(f.LastApply.Result)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.2f\t%s\t%s\t%s\n", localTime(f.Time), orDash(shortPath(f.CurrentSystem)),
			orDash(f.Kernel), durationText(time.Duration(f.UptimeSeconds)*time.Second), f.Load[0], bytesHuman(f.MemoryAvail), encrypted(f.Encryption), last)
	}
	return tw.Flush()
}

func encrypted(e model.Encryption) string {
	if e.RootEncrypted == nil {
		return "unknown"
	}
	return yesNo(*e.RootEncrypted)
}

func bytesHuman(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// printFacts prints the latest facts of a device under devices show.
func printFacts(w io.Writer, f *model.Facts) {
	fmt.Fprintf(w, "facts (%s):\n", localTime(f.Time))
	tw := newTable(w)
	fmt.Fprintf(tw, "  hostname:\t%s\n", f.Hostname)
	fmt.Fprintf(tw, "  nixos:\t%s\n", orDash(f.NixOSVersion))
	fmt.Fprintf(tw, "  current system:\t%s\n", orDash(f.CurrentSystem))
	fmt.Fprintf(tw, "  booted system:\t%s\n", orDash(f.BootedSystem))
	fmt.Fprintf(tw, "  reboot needed:\t%s\n", yesNo(f.RebootNeeded))
	fmt.Fprintf(tw, "  kernel:\t%s\n", orDash(f.Kernel))
	fmt.Fprintf(tw, "  uptime:\t%s\n", durationText(time.Duration(f.UptimeSeconds)*time.Second))
	fmt.Fprintf(tw, "  load:\t%.2f %.2f %.2f\n", f.Load[0], f.Load[1], f.Load[2])
	fmt.Fprintf(tw, "  memory:\t%s available of %s\n", bytesHuman(f.MemoryAvail), bytesHuman(f.MemoryTotal))
	for _, m := range f.Mounts {
		fmt.Fprintf(tw, "  disk %s:\t%.0f%% of %s used\n", m.Path, m.UsedRatio()*100, bytesHuman(m.SizeBytes))
	}
	fmt.Fprintf(tw, "  root encrypted:\t%s\n", encrypted(f.Encryption))
	if len(f.Encryption.LUKSDevices) > 0 {
		fmt.Fprintf(tw, "  LUKS devices:\t%s\n", strings.Join(f.Encryption.LUKSDevices, ", "))
	}
	fmt.Fprintf(tw, "  agent:\t%s\n", orDash(f.AgentVersion))
	if f.LastApply != nil {
		fmt.Fprintf(tw, "  last apply:\t%s %s %s\n", f.LastApply.Result, orDash(f.LastApply.ReleaseID), f.LastApply.Error)
	}
	if len(f.Unknown) > 0 {
		fmt.Fprintf(tw, "  unknown:\t%s\n", strings.Join(f.Unknown, ", "))
	}
	tw.Flush()
}
