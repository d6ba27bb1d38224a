package admin

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
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
		if g.ctx.Err() != nil {
			fmt.Fprintln(g.stderr, "\ninterrupted before the coordinator answered: the rollout may have started; look with `fleet-admin rollout ls`")
		}
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
		fmt.Fprintf(g.stderr, "rollout %s of %s to %s in %s %s\n", ro.ID, ro.ReleaseID, plural(ro.Total, "device", "devices"),
			noun(len(ro.BatchSizes), "batch", "batches"), intList(ro.BatchSizes))
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

// Run lists rollouts, oldest first.
func (RolloutLsCmd) Run(g *Globals) error {
	return printList(g, func(c *Client) ([]model.Rollout, error) {
		rs, err := c.Rollouts(g.ctx)
		slices.SortStableFunc(rs, func(a, b model.Rollout) int {
			return cmp.Or(a.CreatedAt.Compare(b.CreatedAt), strings.Compare(a.ID, b.ID))
		})
		return rs, err
	}, "ID\tRELEASE\tTARGET\tSTATE\tBATCH\tDONE\tFAILED\tCREATED", func(r model.Rollout) string {
		return fmt.Sprintf("%s\t%s\t%s\t%s\t%d/%d\t%d/%d\t%d\t%s", r.ID, r.ReleaseID, target(&r), r.State,
			min(r.Batch+1, len(r.BatchSizes)), len(r.BatchSizes), done(&r), r.Total, failed(&r), localTime(r.CreatedAt))
	})
}

func target(r *model.Rollout) string {
	if r.Group != "" {
		return "group " + r.Group
	}
	return plural(r.Total, "device", "devices")
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
	fmt.Fprintf(g.stdout, "\nbatch %d of %d (%s: %s), max failures %s, health timeout %s, on failure %s\n",
		min(v.Batch+1, len(v.BatchSizes)), len(v.BatchSizes), noun(len(v.BatchSizes), "size", "sizes"), intList(v.BatchSizes),
		v.MaxFailures, durationText(time.Duration(v.HealthTimeout)), v.OnFailure)
	fmt.Fprintf(g.stdout, "created %s, updated %s\n", localTime(v.CreatedAt), localTime(v.UpdatedAt))
	fmt.Fprintf(g.stdout, "%s\n\n", progressCounts(v))
	rows := slices.Clone(v.Progress)
	slices.SortStableFunc(rows, func(a, b model.RolloutProgress) int {
		return cmp.Or(cmp.Compare(a.Batch, b.Batch), strings.Compare(a.Name, b.Name), strings.Compare(a.Device, b.Device))
	})
	tw := newTable(g.stdout)
	fmt.Fprintln(tw, "DEVICE\tID\tBATCH\tSTATE\tSTORE PATH\tERROR")
	for _, d := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", d.Name, shortID(d.Device), d.Batch+1, stateText(d.State), orDash(shortPath(d.StorePath)), d.Error)
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

// Run aborts the rollout, once confirmed.
func (cmd *RolloutAbortCmd) Run(g *Globals) error {
	if err := g.confirm(fmt.Sprintf("abort rollout %s? No further batches start, and it cannot be resumed", cmd.ID)); err != nil {
		return err
	}
	return rolloutAction(g, cmd.ID, "abort")
}

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

// watch polls a rollout's summary each second until it ends or pauses: a
// progress bar on a terminal, JSON lines with --json (the summary, with no
// progress rows), a line per change otherwise. At the end it reads every
// device's progress, page by page: the last JSON line carries it, and the
// devices that failed, timed out or were skipped are listed. A paused
// rollout exits with ExitPaused, a failed, aborted or reverted one with
// ExitFailed. Interrupted (Ctrl-C), it says the rollout continues and how to
// follow or abort it; a coordinator lost for Client.LostAfter ends it with
// ExitUnreachable.
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
			return watchError(g, c, id, tty, err)
		}
		end := ro.State.Finished() || ro.State == model.RolloutPaused
		v := &model.RolloutView{Rollout: *ro}
		if end && (g.JSON || ro.State != model.RolloutSucceeded) {
			if v, err = c.Rollout(g.ctx, id); err != nil {
				return watchError(g, c, id, tty, err)
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
				reason := ""
				if v.Reason != "" {
					reason = ": " + v.Reason
				}
				fmt.Fprintf(g.stderr, "rollout %s %s%s\n", v.ID, v.State, reason)
				for _, d := range v.Progress {
					if d.State.Failed() || d.State == model.DeviceSkipped || d.Error != "" {
						fmt.Fprintf(g.stderr, "  %s (%s): %s %s\n", d.Name, shortID(d.Device), stateText(d.State), d.Error)
					}
				}
				if v.State == model.RolloutPaused {
					fmt.Fprintf(g.stderr, "resume it with `fleet-admin rollout resume %s` (retries the failed devices) or abort it with `fleet-admin rollout abort %s`\n", v.ID, v.ID)
				}
			}
			code := ExitFailed
			if v.State == model.RolloutPaused {
				code = ExitPaused
			}
			return withCode(code, fmt.Errorf("%w: %s", errRolloutStopped, v.State))
		}
		select {
		case <-g.ctx.Done():
			return watchError(g, c, id, tty, g.ctx.Err())
		case <-c.Lost():
			return watchError(g, c, id, tty, c.LostError())
		case <-tick.C:
		}
	}
}

// errRolloutStopped is returned by watch for a rollout that did not
// succeed, so the command exits non-zero.
var errRolloutStopped = errors.New("rollout did not succeed")

// watchError ends a watch that did not see the rollout end: interrupted, it
// says that the rollout continues; the coordinator lost, the same.
func watchError(g *Globals, c *Client, id string, tty bool, err error) error {
	interrupted := g.ctx.Err() != nil
	if !interrupted && !errors.Is(err, errLost) {
		return err
	}
	if tty || interrupted {
		fmt.Fprintln(g.stderr) // off the progress line (and the ^C)
	}
	follow := fmt.Sprintf("follow it with `fleet-admin rollout watch %s`, or stop it with `fleet-admin rollout abort %s`", id, id)
	if interrupted {
		fmt.Fprintf(g.stderr, "stopped watching: rollout %s continues on the coordinator; %s\n", id, follow)
		return withCode(ExitInterrupted, fmt.Errorf("interrupted: %w", err))
	}
	fmt.Fprintf(g.stderr, "rollout %s continues on the coordinator without this watch; once the coordinator is back, %s\n", id, follow)
	return withCode(ExitUnreachable, err)
}

// progressLine renders [#####.....] n/total succeeded, f failed, w
// waiting, q queued · batch b/B · state.
func progressLine(v *model.RolloutView) string {
	total := v.Total
	const width = 30
	fill := 0
	if total > 0 {
		fill = done(&v.Rollout) * width / total
	}
	return fmt.Sprintf("[%s%s] %s · batch %d/%d · %s",
		strings.Repeat("#", fill), strings.Repeat(".", width-fill), progressCounts(v),
		min(v.Batch+1, len(v.BatchSizes)), len(v.BatchSizes), v.State)
}

// progressCounts is "n/total succeeded, f failed, w waiting, q queued"
// (and any skipped, reverted or superseded): the counts add up to the
// total.
func progressCounts(v *model.RolloutView) string {
	parts := []string{fmt.Sprintf("%d/%d succeeded", done(&v.Rollout), v.Total), fmt.Sprintf("%d failed", failed(&v.Rollout)),
		fmt.Sprintf("%d waiting", v.Counts[model.DeviceWaiting]), fmt.Sprintf("%d queued", v.Counts[model.DeviceQueued])}
	for _, s := range []model.DeviceRolloutState{model.DeviceSkipped, model.DeviceReverted, model.DeviceSuperseded} {
		if n := v.Counts[s]; n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, stateText(s)))
		}
	}
	return strings.Join(parts, ", ")
}
