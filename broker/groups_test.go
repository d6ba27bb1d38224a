package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"fleet/accounts"
	"fleet/admin"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// owner dials the fleet's first owner: every request it makes is signed,
// as fleet-admin's are.
func (f *rolloutFleet) owner() *admin.Client {
	f.t.Helper()
	cl, err := admin.Dial(context.Background(), f.c.ClientURL(), filepath.Join(f.c.Config().DataDir, accounts.AdminCredsFile))
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(cl.Close)
	return cl
}

// addDevice records and connects one more simulated device.
func (f *rolloutFleet) addDevice(name string, groups ...string) *simDevice {
	f.t.Helper()
	cr, err := f.c.Authority().NewUser(subjects.RoleAgent, name, 0)
	if err != nil {
		f.t.Fatal(err)
	}
	d := &simDevice{id: cr.PublicKey(), name: name, applied: map[string]int{}}
	d.connect(f.t, f.c, cr)
	rec := model.Device{ID: d.id, Name: name, Groups: groups, Status: model.DeviceActive, EnrolledAt: time.Now()}
	b, _ := json.Marshal(rec)
	kv, _ := f.c.JetStream().KeyValue(context.Background(), subjects.BucketDevices)
	if _, err := kv.Put(context.Background(), d.id, b); err != nil {
		f.t.Fatal(err)
	}
	f.devs = append(f.devs, d)
	f.byName[name] = d
	return d
}

// deploy deploys through the signed API and waits for the rollout to
// succeed.
func (f *rolloutFleet) deploy(cl *admin.Client, req model.DeployRequest) *model.Rollout {
	f.t.Helper()
	var res model.DeployResult
	if err := cl.Call(context.Background(), subjects.VerbDeploy, true, req, &res); err != nil {
		f.t.Fatalf("deploy %+v: %v", req, err)
	}
	if res.Rollout == nil {
		f.t.Fatalf("deploy %+v created no rollout (%d unchanged)", req, res.Unchanged)
	}
	return f.waitState(res.ID, model.RolloutSucceeded)
}

// waitDesired waits until d's desired state names release, and returns it.
func (f *rolloutFleet) waitDesired(d *simDevice, release string) *model.Desired {
	f.t.Helper()
	var des *model.Desired
	poll.Telling(f.t, 30*time.Second, d.name+" told to run "+release, func() (bool, string) {
		des = f.desiredOf(d)
		if des == nil {
			return false, "no desired state"
		}
		return des.ReleaseID == release, "desired " + des.ReleaseID
	})
	return des
}

// waitTarget waits until group's target is release.
func (f *rolloutFleet) waitTarget(group, release string) {
	f.t.Helper()
	kv, _ := f.c.JetStream().KeyValue(context.Background(), subjects.BucketGroups)
	poll.Telling(f.t, 30*time.Second, "group "+group+" target "+release, func() (bool, string) {
		e, err := kv.Get(context.Background(), group)
		if err != nil {
			return release == "", err.Error()
		}
		var t model.GroupTarget
		_ = json.Unmarshal(e.Value(), &t)
		return t.ReleaseID == release, "target " + t.ReleaseID
	})
}

// accepts checks that an agent whose last accepted statement is last
// takes des, as the agent does (signatures by the owner only).
func accepts(t *testing.T, cl *admin.Client, des *model.Desired, self, host string, last model.Statement) model.Statement {
	t.Helper()
	next, err := model.CheckStatement(des, self, host, []string{cl.Key()}, last)
	if err != nil {
		t.Fatalf("%s refuses its desired state %s: %v", host, des.ReleaseID, err)
	}
	return next
}

// convergeRollouts lists the coordinator's convergence rollouts that
// took device id.
func (f *rolloutFleet) convergeRollouts(id string) []*model.Rollout {
	f.t.Helper()
	all, err := f.c.rollouts.List(context.Background())
	if err != nil {
		f.t.Fatal(err)
	}
	var out []*model.Rollout
	for _, ro := range all {
		if ro.Kind != model.KindConverge {
			continue
		}
		if _, err := f.c.rollouts.getDevice(context.Background(), ro.ID, id); err == nil {
			out = append(out, ro)
		}
	}
	return out
}

// TestGroupTargetConverges: a rollout over a group sets its target; a
// device that joins the group later, or is moved into another, converges
// to that group's target, carrying the signed statements an agent checks;
// a device in two groups with different targets gets nothing until it is
// pinned; unpinned and moved, it follows its group again.
func TestGroupTargetConverges(t *testing.T) {
	f := startRolloutFleet(t, 3, "developers")
	cl := f.owner()
	ctx := context.Background()
	gen1, gen2 := storePath("gen1"), storePath("gen2")
	f.release("rel-1", gen1)
	f.release("rel-2", gen2)
	first := f.deploy(cl, model.DeployRequest{ReleaseID: "rel-1", Group: "developers", Strategy: "all"})
	if !first.SetsTarget {
		t.Fatalf("a rollout over a whole group does not set its target: %+v", first)
	}
	f.waitTarget("developers", "rel-1")

	// A device enrolled into the group after the rollout converges.
	late := f.addDevice("late", "developers")
	des := f.waitDesired(late, "rel-1")
	if des.StorePath != gen1 || des.Deploy == nil {
		t.Fatalf("late device's desired state %+v", des)
	}
	accepts(t, cl, des, late.id, late.name, model.Statement{})
	poll.Until(t, 30*time.Second, "the late device applying rel-1", func() bool { return late.appliedCount(gen1) == 1 })
	conv := f.convergeRollouts(late.id)
	if len(conv) != 1 || conv[0].ReleaseID != "rel-1" || conv[0].Group != "developers" {
		t.Fatalf("convergence rollouts of the late device: %+v", conv)
	}
	f.waitState(conv[0].ID, model.RolloutSucceeded)

	// A second group with its own target; a device moved into it goes there.
	labDev := f.addDevice("lab0", "lab")
	if des := f.desiredOf(labDev); des != nil {
		t.Fatalf("a device of a group without a target was told to run %s", des.ReleaseID)
	}
	lab := f.deploy(cl, model.DeployRequest{ReleaseID: "rel-2", Group: "lab", Strategy: "all"})
	f.waitTarget("lab", "rel-2")
	mover := f.byName["dev00"]
	// What the mover's agent accepted so far: the developers deploy.
	moverLast := accepts(t, cl, f.desiredOf(mover), mover.id, mover.name, model.Statement{})
	if _, err := cl.SetDeviceGroups(ctx, mover.id, []string{"lab"}); err != nil {
		t.Fatal(err)
	}
	des = f.waitDesired(mover, "rel-2")
	if des.Join == nil {
		t.Fatalf("the moved device's desired state carries no join statement: %+v", des)
	}
	// The lab deploy was signed after the developers one, but the agent
	// must take it because of the move either way; strip the join and an
	// agent that had accepted something newer would refuse it.
	moverLast = accepts(t, cl, des, mover.id, mover.name, moverLast)
	poll.Until(t, 30*time.Second, "the mover applying rel-2", func() bool { return mover.appliedCount(gen2) == 1 })
	_ = lab

	// Two groups, two targets: a conflict; nothing is applied.
	torn := f.byName["dev01"]
	if _, err := cl.SetDeviceGroups(ctx, torn.id, []string{"developers", "lab"}); err != nil {
		t.Fatal(err)
	}
	// A later change the sweep acts on proves it has seen the conflict.
	witness := f.byName["dev02"]
	if _, err := cl.SetDeviceGroups(ctx, witness.id, []string{"lab"}); err != nil {
		t.Fatal(err)
	}
	f.waitDesired(witness, "rel-2")
	if got := f.desiredOf(torn); got.ReleaseID != "rel-1" || torn.appliedCount(gen2) != 0 {
		t.Fatalf("a device in conflicting groups was given %s", got.ReleaseID)
	}
	var rows []model.GroupRow
	if err := cl.Call(ctx, subjects.VerbGroups, false, nil, &rows); err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		if (r.Group == "developers" || r.Group == "lab") && r.Conflicts != 1 {
			t.Fatalf("groups ls: %+v, want one conflict in developers and lab", rows)
		}
	}
	rep := f.c.Status("")
	i := slices.IndexFunc(rep.Devices, func(r model.DeviceStatusRow) bool { return r.ID == torn.id })
	if i < 0 || !strings.Contains(rep.Devices[i].Conflict, "developers→rel-1") || !strings.Contains(rep.Devices[i].Conflict, "lab→rel-2") {
		t.Fatalf("status does not name the conflict: %+v", rep.Devices[i])
	}

	// A pin settles it: the pin's own signed request is the deploy.
	tornLast := accepts(t, cl, f.desiredOf(torn), torn.id, torn.name, model.Statement{})
	var view model.DeviceView
	if err := cl.Call(ctx, subjects.VerbDevicePin, true, model.DevicePin{Ref: torn.id, ReleaseID: "rel-2"}, &view); err != nil {
		t.Fatal(err)
	}
	if view.Pin == nil || view.Pin.ReleaseID != "rel-2" || view.Pin.Statement != nil || view.Statement != nil {
		t.Fatalf("pinned device view %+v (signed statements are not shown)", view)
	}
	des = f.waitDesired(torn, "rel-2")
	tornLast = accepts(t, cl, des, torn.id, torn.name, tornLast)
	// A group deploy passes pinned devices by.
	var pv model.DeployPreview
	if err := cl.Call(ctx, subjects.VerbDeployPreview, false, model.DeployRequest{ReleaseID: "rel-1", Group: "lab", Strategy: "all"}, &pv); err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(pv.Skipped, func(d model.PreviewDevice) bool { return d.ID == torn.id && strings.Contains(d.Reason, "pinned") }) {
		t.Fatalf("preview of a group deploy does not skip the pinned device: %+v", pv)
	}

	// Unpinned, it is torn again: it stays where it is.
	if err := cl.Call(ctx, subjects.VerbDevicePin, true, model.DevicePin{Ref: torn.id}, &view); err != nil {
		t.Fatal(err)
	}
	// Moved to developers alone, it goes back to rel-1: the developers
	// deploy is older than the pin, the move newer.
	if _, err := cl.SetDeviceGroups(ctx, torn.id, []string{"developers"}); err != nil {
		t.Fatal(err)
	}
	des = f.waitDesired(torn, "rel-1")
	accepts(t, cl, des, torn.id, torn.name, tornLast)
	stale := *des
	stale.Join = nil
	if _, err := model.CheckStatement(&stale, torn.id, torn.name, []string{cl.Key()}, tornLast); err == nil {
		t.Fatal("an agent would take the group's older deploy without the move's statement")
	}
	_ = moverLast
}

// TestRolloutUndo: undoing a succeeded rollout sets its devices back,
// signed by the operator's undo, and gives the group its earlier target.
func TestRolloutUndo(t *testing.T) {
	f := startRolloutFleet(t, 4, "developers")
	cl := f.owner()
	ctx := context.Background()
	gen1, gen2 := storePath("gen1"), storePath("gen2")
	f.release("rel-1", gen1)
	f.release("rel-2", gen2)
	f.deploy(cl, model.DeployRequest{ReleaseID: "rel-1", Group: "developers", Strategy: "all"})
	f.waitTarget("developers", "rel-1")
	last := map[string]model.Statement{}
	for _, d := range f.devs {
		last[d.id] = accepts(t, cl, f.desiredOf(d), d.id, d.name, model.Statement{})
	}
	second := f.deploy(cl, model.DeployRequest{ReleaseID: "rel-2", Group: "developers", Strategy: "all"})
	f.waitTarget("developers", "rel-2")
	for _, d := range f.devs {
		last[d.id] = accepts(t, cl, f.desiredOf(d), d.id, d.name, last[d.id])
	}

	// The signed undo must name the rollout's release.
	err := cl.Call(ctx, subjects.VerbRolloutAction, true, model.RolloutRef{ID: second.ID, Action: model.RolloutUndo, ReleaseID: "rel-1"}, nil)
	if err == nil || !strings.Contains(err.Error(), "rel-2") {
		t.Fatalf("an undo naming another release: %v", err)
	}
	var ro model.Rollout
	if err := cl.Call(ctx, subjects.VerbRolloutAction, true, model.RolloutRef{ID: second.ID, Action: model.RolloutUndo, ReleaseID: "rel-2"}, &ro); err != nil {
		t.Fatal(err)
	}
	done := f.waitState(second.ID, model.RolloutReverted)
	if done.Counts[model.DeviceReverted] != 4 {
		t.Fatalf("undone rollout counts %v", done.Counts)
	}
	for _, d := range f.devs {
		des := f.desiredOf(d)
		if des.ReleaseID != "rel-1" || des.Revert == nil {
			t.Fatalf("%s after undo: %+v", d.name, des)
		}
		accepts(t, cl, des, d.id, d.name, last[d.id])
	}
	f.waitTarget("developers", "rel-1")
	// Undone once is enough.
	if err := cl.Call(ctx, subjects.VerbRolloutAction, true, model.RolloutRef{ID: second.ID, Action: model.RolloutUndo, ReleaseID: "rel-2"}, nil); err == nil {
		t.Fatal("a reverted rollout was undone again")
	}
}

// TestDeployPreviewWritesNothing: a dry run changes no bucket; shrinking
// batches are refused; a sample is drawn the same way from the same seed.
func TestDeployPreviewWritesNothing(t *testing.T) {
	f := startRolloutFleet(t, 6, "developers")
	cl := f.owner()
	ctx := context.Background()
	f.release("rel-1", storePath("gen1"))
	js := f.c.JetStream()
	seqs := func() map[string]uint64 {
		out := map[string]uint64{}
		for _, b := range subjects.Buckets {
			if b == subjects.BucketNonces { // the replay cache, of every request
				continue
			}
			kv, err := js.KeyValue(ctx, b)
			if err != nil {
				t.Fatal(err)
			}
			st, err := kv.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			out[b] = st.(*jetstream.KeyValueBucketStatus).StreamInfo().State.LastSeq
		}
		return out
	}
	before := seqs()
	req := model.DeployRequest{ReleaseID: "rel-1", Group: "developers", Strategy: "staged", Batches: "1,50%", Sample: "50%", Seed: 42}
	var a, b model.DeployPreview
	if err := cl.Call(ctx, subjects.VerbDeployPreview, false, req, &a); err != nil {
		t.Fatal(err)
	}
	if err := cl.Call(ctx, subjects.VerbDeployPreview, false, req, &b); err != nil {
		t.Fatal(err)
	}
	if after := seqs(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("a dry run wrote: %v → %v", before, after)
	}
	if len(a.Devices) != 3 || fmt.Sprint(a.BatchSizes) != "[1 1 1]" || a.Seed != 42 {
		t.Fatalf("preview of half of six devices: %+v", a)
	}
	if fmt.Sprint(a.Devices) != fmt.Sprint(b.Devices) {
		t.Fatalf("the same seed drew two cohorts: %v, %v", a.Devices, b.Devices)
	}
	req.Batches = "50%,1"
	err := cl.Call(ctx, subjects.VerbDeploy, true, req, nil)
	if err == nil || !strings.Contains(err.Error(), "cumulative") {
		t.Fatalf("shrinking batches: %v", err)
	}

	// The sampled rollout takes the cohort the preview showed, and sets no
	// group target.
	req.Batches = "1,50%"
	var res model.DeployResult
	if err := cl.Call(ctx, subjects.VerbDeploy, true, req, &res); err != nil {
		t.Fatal(err)
	}
	ro := f.waitState(res.ID, model.RolloutSucceeded)
	if ro.Total != 3 || ro.SetsTarget || ro.Sample != "50%" || ro.Seed != 42 {
		t.Fatalf("sampled rollout %+v", ro)
	}
	devs, err := f.c.rollouts.Devices(ctx, ro)
	if err != nil {
		t.Fatal(err)
	}
	for i, d := range devs {
		if d.Device != a.Devices[i].ID {
			t.Fatalf("rollout device %d is %s, the preview showed %s", i, d.Name, a.Devices[i].Name)
		}
	}
}
