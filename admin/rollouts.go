package admin

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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
	Group         string   `help:"Target every active device of this group (on success the release becomes the group's target: devices that join later get it)."`
	Device        []string `help:"Target this device (ID, ID prefix or name; repeatable)."`
	Strategy      string   `help:"all (one batch), canary (1, then all) or staged (--batches)." default:"staged" enum:"all,canary,staged"`
	Batches       string   `help:"Cumulative batch sizes for staged, e.g. 1,10%,100%." placeholder:"SPEC"`
	Sample        string   `help:"Deploy to a random cohort of the target only (a canary across a big group), e.g. 5% or 20; it does not set the group's target." placeholder:"N|P%"`
	Seed          uint64   `help:"Seed of --sample's draw (default: random; recorded in the rollout)." placeholder:"N"`
	MaxFailures   string   `help:"Failures allowed before the rollout stops: a count or a percentage." default:"0" placeholder:"N|P%"`
	HealthTimeout string   `help:"How long a device has to report success." default:"5m"`
	OnFailure     string   `help:"pause, or revert earlier batches to their previous release." default:"pause" enum:"pause,revert"`
	Supersede     bool     `help:"Take devices out of other unfinished rollouts."`
	DryRun        bool     `name:"dry-run" help:"Show what the deploy would do (per device its current and new system, who is skipped or offline, the batches) and change nothing."`
	Wait          bool     `help:"Follow the rollout until it ends; exit non-zero unless it succeeds."`
}

// Run starts a rollout. On a terminal it first shows the preview and
// asks (--yes skips that); --dry-run shows the preview alone.
func (cmd *DeployCmd) Run(g *Globals) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	// The signed deploy names devices by their full IDs: each device
	// checks that it is named, and a shown name may not be its host name.
	ids := make([]string, len(cmd.Device))
	for i, ref := range cmd.Device {
		d, err := c.Device(g.ctx, ref)
		if err != nil {
			return err
		}
		ids[i] = d.ID
	}
	req := model.DeployRequest{
		ReleaseID: cmd.Release, Group: cmd.Group, Devices: ids, Strategy: cmd.Strategy,
		Batches: cmd.Batches, MaxFailures: cmd.MaxFailures, HealthTimeout: cmd.HealthTimeout,
		OnFailure: cmd.OnFailure, Supersede: cmd.Supersede, Sample: cmd.Sample, Seed: cmd.Seed,
	}
	if cmd.DryRun || (g.stdinTTY && !g.Yes && !g.JSON) {
		var pv model.DeployPreview
		if err := c.Call(g.ctx, subjects.VerbDeployPreview, false, req, &pv); err != nil {
			return err
		}
		if cmd.DryRun && g.JSON {
			return g.printJSON(pv)
		}
		if cmd.DryRun {
			printPreview(g.stdout, &pv)
		} else {
			printPreview(g.stderr, &pv)
		}
		if cmd.DryRun {
			return nil
		}
		if len(pv.Devices) == 0 {
			fmt.Fprintf(g.stderr, "nothing to do: every target already runs %s\n", pv.ReleaseID)
			return nil
		}
		if err := g.confirm(fmt.Sprintf("deploy %s to %s?", pv.ReleaseID, plural(len(pv.Devices), "device", "devices"))); err != nil {
			return err
		}
		// The confirmed cohort is the one deployed.
		req.Seed = pv.Seed
	}
	var res model.DeployResult
	if err := c.Call(g.ctx, subjects.VerbDeploy, true, req, &res); err != nil {
		if g.ctx.Err() != nil {
			fmt.Fprintln(g.stderr, "\ninterrupted before the coordinator answered: the rollout may have started; look with `fleet-admin rollout ls`")
		}
		return err
	}
	if res.Rollout == nil {
		// Every target already runs the release: no rollout was made.
		if g.JSON {
			return g.printJSON(res)
		}
		fmt.Fprintf(g.stderr, "nothing to do: %s already %s %s; no rollout was created\n",
			plural(res.Unchanged, "device", "devices"), noun(res.Unchanged, "runs", "run"), cmd.Release)
		return nil
	}
	ro := res.Rollout
	// Hosts the release has no closure for are named either way (stderr,
	// so stdout stays the rollout id alone).
	if !g.JSON {
		if len(ro.Skipped) > 0 {
			fmt.Fprintf(g.stderr, "skipped (no closure in release %s): %s\n", ro.ReleaseID, strings.Join(ro.Skipped, ", "))
		}
		if res.Unchanged > 0 {
			fmt.Fprintf(g.stderr, "skipped: %s already %s %s\n", plural(res.Unchanged, "device", "devices"), noun(res.Unchanged, "runs", "run"), ro.ReleaseID)
		}
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

// printPreview shows a deploy's preview: the batches resolved to counts,
// then each device, and who is left out and why.
func printPreview(w io.Writer, pv *model.DeployPreview) {
	target := "devices"
	if pv.Group != "" {
		target = "group " + pv.Group
	}
	fmt.Fprintf(w, "deploy %s to %s: %s", pv.ReleaseID, target, plural(len(pv.Devices), "device changes", "devices change"))
	if pv.Sample != "" {
		fmt.Fprintf(w, " (a sample of %s, seed %d)", pv.Sample, pv.Seed)
	}
	if len(pv.BatchSizes) > 0 {
		specs := make([]string, len(pv.BatchSizes))
		for i := range pv.BatchSizes {
			specs[i] = pv.Batches[min(i, len(pv.Batches)-1)].String()
		}
		fmt.Fprintf(w, " in %s %s (%s)", noun(len(pv.BatchSizes), "batch", "batches"), intList(pv.BatchSizes), strings.Join(specs, ", "))
	}
	fmt.Fprintln(w)
	tw := newTable(w)
	if len(pv.Devices) > 0 {
		fmt.Fprintln(tw, "BATCH\tDEVICE\tID\tONLINE\tCURRENT\tNEW")
		for _, d := range pv.Devices {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", d.Batch+1, d.Name, shortID(d.ID), onlineText(d), orDash(shortPath(d.Current)), shortPath(d.New))
		}
	}
	_ = tw.Flush()
	for _, l := range []struct {
		what string
		ds   []model.PreviewDevice
	}{{"unchanged", pv.Unchanged}, {"skipped", pv.Skipped}} {
		if len(l.ds) == 0 {
			continue
		}
		fmt.Fprintf(w, "%s (%d):\n", l.what, len(l.ds))
		for _, d := range l.ds {
			fmt.Fprintf(w, "  %s (%s): %s\n", d.Name, shortID(d.ID), d.Reason)
		}
	}
	if len(pv.Busy) > 0 {
		fmt.Fprintf(w, "in unfinished rollouts (deploy refuses them unless --supersede): %s\n", strings.Join(pv.Busy, ", "))
	}
}

// onlineText is "yes", or "no (last seen 3h ago)".
func onlineText(d model.PreviewDevice) string {
	if d.Online {
		return "yes"
	}
	return "no (last seen " + ago(d.LastSeen) + ")"
}

// RolloutCmd is `fleet-admin rollout`.
type RolloutCmd struct {
	Ls     RolloutLsCmd     `cmd:"" help:"List rollouts."`
	Show   RolloutShowCmd   `cmd:"" help:"Show a rollout and each device's progress."`
	Watch  RolloutWatchCmd  `cmd:"" help:"Follow a rollout until it ends (progress bar on a terminal, JSON lines with --json)."`
	Pause  RolloutPauseCmd  `cmd:"" help:"Pause a running rollout."`
	Resume RolloutResumeCmd `cmd:"" help:"Resume a paused rollout (retries its failed devices)."`
	Abort  RolloutAbortCmd  `cmd:"" help:"Abort a rollout: no further batches (--revert also sets its devices back)."`
	Undo   RolloutUndoCmd   `cmd:"" help:"Set every device a rollout touched back to its previous desired state."`
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
	t := plural(r.Total, "device", "devices")
	if r.Group != "" {
		t = "group " + r.Group
	}
	switch {
	case r.Kind == model.KindConverge && r.Group != "":
		// The coordinator brings devices that joined the group to its target.
		return plural(r.Total, "device", "devices") + " joining " + t
	case r.Kind == model.KindConverge:
		return plural(r.Total, "device", "devices") + " to its pin"
	case r.Sample != "":
		return t + " (sample " + r.Sample + ")"
	}
	return t
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
func (cmd *RolloutPauseCmd) Run(g *Globals) error {
	return rolloutAction(g, cmd.ID, model.RolloutPause)
}

// RolloutResumeCmd is `fleet-admin rollout resume`.
type RolloutResumeCmd struct {
	ID string `arg:"" help:"Rollout id."`
}

// Run resumes the rollout.
func (cmd *RolloutResumeCmd) Run(g *Globals) error {
	return rolloutAction(g, cmd.ID, model.RolloutResume)
}

// RolloutAbortCmd is `fleet-admin rollout abort`.
type RolloutAbortCmd struct {
	ID     string `arg:"" help:"Rollout id."`
	Revert bool   `help:"Also set every device the rollout touched back to its previous desired state."`
}

// Run aborts the rollout, once confirmed, and says where its devices are
// left.
func (cmd *RolloutAbortCmd) Run(g *Globals) error {
	if cmd.Revert {
		return undoRollout(g, cmd.ID, model.RolloutAbort, "abort rollout %s and set the %s it touched back to their previous release?")
	}
	if err := g.confirm(fmt.Sprintf("abort rollout %s? No further batches start, and it cannot be resumed", cmd.ID)); err != nil {
		return err
	}
	return g.withClient(func(c *Client) error {
		var ro model.Rollout
		if err := c.Call(g.ctx, subjects.VerbRolloutAction, true, model.RolloutRef{ID: cmd.ID, Action: model.RolloutAbort}, &ro); err != nil {
			return err
		}
		if g.JSON {
			return g.printJSON(ro)
		}
		got := ro.Counts[model.DeviceSucceeded] + ro.Counts[model.DeviceFailed] + ro.Counts[model.DeviceTimedOut] + ro.Counts[model.DeviceWaiting]
		fmt.Fprintf(g.stdout, "rollout %s: %s\n", ro.ID, ro.State)
		fmt.Fprintf(g.stdout, "%s got %s (%d succeeded, %d failed, %d still applying); %s never started and keep their previous release\n",
			plural(got, "device", "devices"), ro.ReleaseID, ro.Counts[model.DeviceSucceeded], failed(&ro), ro.Counts[model.DeviceWaiting],
			plural(ro.Counts[model.DeviceQueued], "device", "devices"))
		if got > 0 {
			fmt.Fprintf(g.stdout, "to set them back: fleet-admin rollout undo %s\n", ro.ID)
		}
		return nil
	})
}

// RolloutUndoCmd is `fleet-admin rollout undo`.
type RolloutUndoCmd struct {
	ID string `arg:"" help:"Rollout id."`
}

// Run undoes the rollout, once confirmed.
func (cmd *RolloutUndoCmd) Run(g *Globals) error {
	return undoRollout(g, cmd.ID, model.RolloutUndo, "undo rollout %s: set the %s it touched back to their previous release?")
}

// undoRollout asks the coordinator to set a rollout's devices back (undo,
// or abort with revert), then waits until it has and says what became of
// each device. The signed request names the rollout's release: each
// device checks that it undoes the release it runs.
func undoRollout(g *Globals, id, action, question string) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	ro, err := c.RolloutSummary(g.ctx, id)
	if err != nil {
		return err
	}
	touched := ro.Total - ro.Counts[model.DeviceQueued] - ro.Counts[model.DeviceSkipped] - ro.Counts[model.DeviceSuperseded]
	if err := g.confirm(fmt.Sprintf(question, id, plural(touched, "device", "devices"))); err != nil {
		return err
	}
	var out model.Rollout
	ref := model.RolloutRef{ID: id, Action: action, Revert: action == model.RolloutAbort, ReleaseID: ro.ReleaseID}
	if err := c.Call(g.ctx, subjects.VerbRolloutAction, true, ref, &out); err != nil {
		return err
	}
	if !g.JSON {
		fmt.Fprintf(g.stderr, "rollout %s: %s; waiting for the coordinator to set its devices back\n", id, out.State)
	}
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for out.State == model.RolloutReverting {
		select {
		case <-g.ctx.Done():
			fmt.Fprintf(g.stderr, "\nstopped waiting: the coordinator goes on setting rollout %s's devices back; see fleet-admin rollout show %s\n", id, id)
			return withCode(ExitInterrupted, g.ctx.Err())
		case <-c.Lost():
			return withCode(ExitUnreachable, c.LostError())
		case <-tick.C:
		}
		s, err := c.RolloutSummary(g.ctx, id)
		if err != nil {
			return err
		}
		out = *s
	}
	v, err := c.Rollout(g.ctx, id)
	if err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(v)
	}
	fmt.Fprintf(g.stdout, "rollout %s: %s — %s\n", v.ID, v.State, v.Reason)
	tw := newTable(g.stdout)
	fmt.Fprintln(tw, "DEVICE\tID\tSTATE\tBACK TO\tNOTE")
	for _, d := range v.Progress {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", d.Name, shortID(d.Device), stateText(d.State), orDash(d.PreviousRelease), d.Error)
	}
	return tw.Flush()
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
