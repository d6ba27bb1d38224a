package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/mattn/go-isatty"

	"fleet/model"
	"fleet/subjects"
)

// DeployCmd is `fleet-admin deploy`.
type DeployCmd struct {
	Release       string   `help:"Release id to roll out." required:""`
	Group         string   `help:"Target every active device of this group."`
	Device        []string `help:"Target this device (ID, ID prefix or name; repeatable)."`
	Strategy      string   `help:"all (one batch), canary (1, then all) or staged (--batches)." default:"staged" enum:"all,canary,staged"`
	Batches       string   `help:"Cumulative batch sizes for staged, e.g. 1,10%,100%." placeholder:"SPEC"`
	MaxFailures   string   `help:"Failures allowed before the rollout stops: a count or a percentage." default:"0" placeholder:"N|P%"`
	HealthTimeout string   `help:"How long a device has to report success." default:"5m"`
	OnFailure     string   `help:"pause, or revert earlier batches to their previous release." default:"pause" enum:"pause,revert"`
	Supersede     bool     `help:"Take devices out of other unfinished rollouts."`
	Wait          bool     `help:"Follow the rollout until it ends; exit non-zero unless it succeeds."`
}

// Run starts a rollout.
func (cmd *DeployCmd) Run(g *Globals) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	req := model.DeployRequest{
		ReleaseID: cmd.Release, Group: cmd.Group, Devices: cmd.Device, Strategy: cmd.Strategy,
		Batches: cmd.Batches, MaxFailures: cmd.MaxFailures, HealthTimeout: cmd.HealthTimeout,
		OnFailure: cmd.OnFailure, Supersede: cmd.Supersede,
	}
	var ro model.Rollout
	if err := c.Call(g.ctx, subjects.VerbDeploy, true, req, &ro); err != nil {
		return err
	}
	// Hosts the release has no closure for are named either way (stderr,
	// so stdout stays the rollout id alone).
	if len(ro.Skipped) > 0 && !g.JSON {
		fmt.Fprintf(g.stderr, "skipped (no closure in release %s): %s\n", ro.ReleaseID, strings.Join(ro.Skipped, ", "))
	}
	if !cmd.Wait {
		if g.JSON {
			return g.printJSON(ro)
		}
		_, err := fmt.Fprintln(g.stdout, ro.ID)
		return err
	}
	if !g.JSON {
		fmt.Fprintf(g.stderr, "rollout %s of %s to %d device(s) in batches %v\n", ro.ID, ro.ReleaseID, ro.Total, ro.BatchSizes)
	}
	return watch(g, c, ro.ID)
}

// RolloutCmd is `fleet-admin rollout`.
type RolloutCmd struct {
	Ls     RolloutLsCmd     `cmd:"" help:"List rollouts."`
	Show   RolloutShowCmd   `cmd:"" help:"Show a rollout and each device's progress."`
	Watch  RolloutWatchCmd  `cmd:"" help:"Follow a rollout until it ends (progress bar on a terminal, JSON lines with --json)."`
	Pause  RolloutPauseCmd  `cmd:"" help:"Pause a running rollout."`
	Resume RolloutResumeCmd `cmd:"" help:"Resume a paused rollout (retries its failed devices)."`
	Abort  RolloutAbortCmd  `cmd:"" help:"Abort a rollout: no further batches."`
}

// RolloutLsCmd is `fleet-admin rollout ls`.
type RolloutLsCmd struct{}

// Run lists rollouts.
func (RolloutLsCmd) Run(g *Globals) error {
	return printList(g, func(c *Client) ([]model.Rollout, error) { return c.Rollouts(g.ctx) },
		"ID\tRELEASE\tTARGET\tSTATE\tBATCH\tDONE\tFAILED\tCREATED", func(r model.Rollout) string {
			return fmt.Sprintf("%s\t%s\t%s\t%s\t%d/%d\t%d/%d\t%d\t%s", r.ID, r.ReleaseID, target(&r), r.State,
				min(r.Batch+1, len(r.BatchSizes)), len(r.BatchSizes), done(&r), r.Total, failed(&r), r.CreatedAt.Local().Format(time.DateTime))
		})
}

func target(r *model.Rollout) string {
	if r.Group != "" {
		return "group " + r.Group
	}
	return fmt.Sprintf("%d device(s)", r.Total)
}

func done(r *model.Rollout) int { return r.Counts[model.DeviceSucceeded] }

func failed(r *model.Rollout) int {
	return r.Counts[model.DeviceFailed] + r.Counts[model.DeviceTimedOut]
}

// RolloutShowCmd is `fleet-admin rollout show`.
type RolloutShowCmd struct {
	ID string `arg:"" help:"Rollout id."`
}

// Run shows a rollout.
func (cmd *RolloutShowCmd) Run(g *Globals) error {
	var v *model.RolloutView
	err := g.withClient(func(c *Client) (err error) {
		v, err = c.Rollout(g.ctx, cmd.ID)
		return err
	})
	if err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(v)
	}
	fmt.Fprintf(g.stdout, "rollout %s of %s (%s): %s", v.ID, v.ReleaseID, target(&v.Rollout), v.State)
	if v.Reason != "" {
		fmt.Fprintf(g.stdout, " — %s", v.Reason)
	}
	fmt.Fprintf(g.stdout, "\nbatch %d of %d %v, max failures %s, health timeout %s, on failure %s\n\n",
		min(v.Batch+1, len(v.BatchSizes)), len(v.BatchSizes), v.BatchSizes, v.MaxFailures, time.Duration(v.HealthTimeout), v.OnFailure)
	tw := newTable(g.stdout)
	fmt.Fprintln(tw, "DEVICE\tBATCH\tSTATE\tSTORE PATH\tERROR")
	for _, d := range v.Progress {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", d.Name, d.Batch+1, d.State, shortPath(d.StorePath), d.Error)
	}
	return tw.Flush()
}

// RolloutWatchCmd is `fleet-admin rollout watch`.
type RolloutWatchCmd struct {
	ID string `arg:"" help:"Rollout id."`
}

// Run follows a rollout.
func (cmd *RolloutWatchCmd) Run(g *Globals) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	return watch(g, c, cmd.ID)
}

// RolloutPauseCmd is `fleet-admin rollout pause`.
type RolloutPauseCmd struct {
	ID string `arg:"" help:"Rollout id."`
}

// Run pauses the rollout.
func (cmd *RolloutPauseCmd) Run(g *Globals) error { return rolloutAction(g, cmd.ID, "pause") }

// RolloutResumeCmd is `fleet-admin rollout resume`.
type RolloutResumeCmd struct {
	ID string `arg:"" help:"Rollout id."`
}

// Run resumes the rollout.
func (cmd *RolloutResumeCmd) Run(g *Globals) error { return rolloutAction(g, cmd.ID, "resume") }

// RolloutAbortCmd is `fleet-admin rollout abort`.
type RolloutAbortCmd struct {
	ID string `arg:"" help:"Rollout id."`
}

// Run aborts the rollout.
func (cmd *RolloutAbortCmd) Run(g *Globals) error { return rolloutAction(g, cmd.ID, "abort") }

func rolloutAction(g *Globals, id, action string) error {
	var ro model.Rollout
	if err := g.call(subjects.VerbRolloutAction, true, model.RolloutRef{ID: id, Action: action}, &ro); err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(ro)
	}
	_, err := fmt.Fprintf(g.stdout, "rollout %s: %s\n", ro.ID, ro.State)
	return err
}

// errRolloutStopped is returned by watch for a rollout that did not
// succeed, so the command exits non-zero.
var errRolloutStopped = errors.New("rollout did not succeed")

// watch polls a rollout's summary each second until it ends or pauses: a
// progress bar on a terminal, JSON lines with --json (the summary, with no
// progress rows), a line per change otherwise. At the end it reads every
// device's progress, page by page: the last JSON line carries it, and the
// devices that failed, timed out or were skipped are listed.
func watch(g *Globals, c *Client, id string) error {
	tty := false
	if f, ok := g.stdout.(*os.File); ok {
		tty = isatty.IsTerminal(f.Fd())
	}
	last := ""
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		ctx, cancel := context.WithTimeout(g.ctx, 30*time.Second)
		ro, err := c.RolloutSummary(ctx, id)
		cancel()
		if err != nil {
			return err
		}
		end := ro.State.Finished() || ro.State == model.RolloutPaused
		v := &model.RolloutView{Rollout: *ro}
		if end && (g.JSON || ro.State != model.RolloutSucceeded) {
			if v, err = c.Rollout(g.ctx, id); err != nil {
				return err
			}
		}
		line := progressLine(v)
		if line != last || (end && g.JSON) {
			switch {
			case g.JSON:
				b, _ := json.Marshal(v)
				fmt.Fprintln(g.stdout, string(b))
			case tty:
				fmt.Fprintf(g.stdout, "\r\033[K%s", line)
			default:
				fmt.Fprintln(g.stdout, line)
			}
			last = line
		}
		if end {
			if tty && !g.JSON {
				fmt.Fprintln(g.stdout)
			}
			if v.State == model.RolloutSucceeded {
				return nil
			}
			if !g.JSON {
				fmt.Fprintf(g.stderr, "rollout %s %s: %s\n", v.ID, v.State, v.Reason)
				for _, d := range v.Progress {
					if d.State.Failed() || d.State == model.DeviceSkipped || d.Error != "" {
						fmt.Fprintf(g.stderr, "  %s (%s): %s %s\n", d.Name, d.Device, d.State, d.Error)
					}
				}
			}
			return fmt.Errorf("%w: %s", errRolloutStopped, v.State)
		}
		select {
		case <-g.ctx.Done():
			return g.ctx.Err()
		case <-tick.C:
		}
	}
}

// progressLine renders [#####.....] n/total succeeded, f failed, batch b/B.
func progressLine(v *model.RolloutView) string {
	total := v.Total
	ok := done(&v.Rollout)
	const width = 30
	fill := 0
	if total > 0 {
		fill = ok * width / total
	}
	return fmt.Sprintf("[%s%s] %d/%d succeeded, %d failed, %d waiting · batch %d/%d · %s",
		strings.Repeat("#", fill), strings.Repeat(".", width-fill), ok, total, failed(&v.Rollout),
		v.Counts[model.DeviceWaiting], min(v.Batch+1, len(v.BatchSizes)), len(v.BatchSizes), v.State)
}
