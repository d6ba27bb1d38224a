package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// A leader that loses its lock stops at once and drives nothing until it
// holds the lock again: two coordinators never both drive rollouts.
func TestEngineStepsDownWhenTheLockIsLost(t *testing.T) {
	f := startRolloutFleet(t, 2, "developers")
	ctx := ctxT(t, 60*time.Second)
	f.release("rel-1", storePath("one"))
	poll.Until(t, 10*time.Second, "the engine leading", func() bool { return f.c.rollouts.leading.Load() })
	// Another coordinator's lock replaces ours (as after a partition).
	locks := holdEngine(ctx, t, f)
	ro, err := f.c.rollouts.Create(ctx, model.DeployRequest{ReleaseID: "rel-1", Group: "developers", Strategy: "all"}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	// While the other holds the lock, nothing is driven: no device got a
	// desired state, and ours did not take the lock back.
	e, err := locks.Get(ctx, engineLockKey)
	if err != nil || string(e.Value()) != "another-coordinator" {
		t.Fatalf("the lock after stepping down: %v", err)
	}
	for _, d := range f.devs {
		if d.appliedCount(storePath("one")) != 0 {
			t.Fatalf("%s was driven by a coordinator without the lock", d.name)
		}
	}
	// The other goes away: ours leads again and finishes the rollout.
	if err := locks.Delete(ctx, engineLockKey); err != nil {
		t.Fatal(err)
	}
	f.waitState(ro.ID, model.RolloutSucceeded)
	for _, d := range f.devs {
		if n := d.appliedCount(storePath("one")); n != 1 {
			t.Fatalf("%s applied %d times", d.name, n)
		}
	}
}

// Two deploys of the same devices at the same moment (as on two
// coordinators): both may pass the check for unfinished rollouts, but only
// one claims the devices; the other is refused and drives nothing.
func TestConcurrentDeploysClaimOnce(t *testing.T) {
	f := startRolloutFleet(t, 3, "developers")
	ctx := ctxT(t, 60*time.Second)
	f.release("rel-a", storePath("a"))
	f.release("rel-b", storePath("b"))
	poll.Until(t, 10*time.Second, "the engine leading", func() bool { return f.c.rollouts.leading.Load() })
	for round := range 3 {
		// Hold the engine (another coordinator has the lock): no rollout
		// can finish between the two deploys and free the devices, so
		// exactly one may win.
		locks := holdEngine(ctx, t, f)
		type result struct {
			ro  *model.Rollout
			err error
		}
		res := make(chan result, 2)
		for _, rel := range []string{"rel-a", "rel-b"} {
			go func() {
				ro, err := f.c.rollouts.Create(ctx, model.DeployRequest{ReleaseID: rel, Group: "developers", Strategy: "all"}, "test", nil)
				if err != nil {
					res <- result{nil, err}
					return
				}
				res <- result{ro.Rollout, nil}
			}()
		}
		var won []*model.Rollout
		for range 2 {
			r := <-res
			if r.err == nil {
				won = append(won, r.ro)
			} else if !strings.Contains(r.err.Error(), "claimed") && !strings.Contains(r.err.Error(), "already in unfinished rollout") {
				t.Fatalf("round %d: the losing deploy: %v", round, r.err)
			}
		}
		if len(won) != 1 {
			t.Fatalf("round %d: %d deploys of the same devices were accepted", round, len(won))
		}
		if err := locks.Delete(ctx, engineLockKey); err != nil {
			t.Fatal(err)
		}
		f.waitState(won[0].ID, model.RolloutSucceeded)
	}
}

// Claims a failed deploy gave back (delete markers on their keys) are
// free: the next deploy takes them, a few devices or many (one read of
// every claim), and takes a finished rollout's over in the same way.
func TestClaimsGivenBackAreTakenAgain(t *testing.T) {
	f := startRolloutFleet(t, 1, "developers")
	ctx := ctxT(t, 60*time.Second)
	claims := bucketOf(ctx, t, f.c, subjects.BucketClaims)
	for _, n := range []int{1, claimScanFrom + 8} {
		devs := make([]*model.RolloutDevice, n)
		for i := range devs {
			devs[i] = &model.RolloutDevice{Device: fmt.Sprintf("UCLAIMED%03d%05d", n, i), Name: fmt.Sprintf("host-%d", i)}
		}
		undo, _, err := f.c.rollouts.claim(ctx, "ro-failed", devs, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		undo()
		if _, _, err := f.c.rollouts.claim(ctx, "ro-next", devs, nil, nil); err != nil {
			t.Fatalf("%d devices: claims given back were not taken again: %v", n, err)
		}
		for _, d := range devs {
			e, err := claims.Get(ctx, d.Device)
			if err != nil || string(e.Value()) != "ro-next" {
				t.Fatalf("%d devices: claim of %s after the second deploy: %v", n, d.Device, err)
			}
		}
	}
}

// An engine that stopped after it wrote (and told) a batch's desired
// states but before it recorded the devices as waiting leaves them queued.
// Undone before another engine restarts the batch, those devices are set
// back all the same: their desired state is the rollout's.
func TestUndoSetsBackDevicesToldBeforeTheirRecord(t *testing.T) {
	f := startRolloutFleet(t, 2, "developers")
	cl := f.owner()
	ctx := ctxT(t, 60*time.Second)
	f.release("rel-1", storePath("gen1"))
	f.release("rel-2", storePath("gen2"))
	f.deploy(cl, model.DeployRequest{ReleaseID: "rel-1", Group: "developers", Strategy: "all"})
	f.waitTarget("developers", "rel-1")

	desired := bucketOf(ctx, t, f.c, subjects.BucketDesired)
	locks := holdEngine(ctx, t, f)
	// Within the lock's lifetime (the bucket's TTL frees it).
	var res model.DeployResult
	if err := cl.Call(ctx, subjects.VerbDeploy, true, model.DeployRequest{ReleaseID: "rel-2", Group: "developers", Strategy: "all"}, &res); err != nil || res.Rollout == nil {
		t.Fatalf("deploy: %v (%+v)", err, res)
	}
	second := res.Rollout
	// What the stopped engine wrote: every device's desired state, no
	// record of it.
	for _, d := range f.devs {
		b, _ := json.Marshal(model.Desired{Device: d.id, ReleaseID: "rel-2", RolloutID: second.ID, StorePath: storePath("gen2"), IssuedAt: time.Now().UTC()})
		if _, err := desired.Put(ctx, d.id, b); err != nil {
			t.Fatal(err)
		}
	}
	if err := cl.Call(ctx, subjects.VerbRolloutAction, true, model.RolloutRef{ID: second.ID, Action: model.RolloutUndo, ReleaseID: "rel-2"}, nil); err != nil {
		t.Fatal(err)
	}
	if ro, _, err := f.c.rollouts.Get(ctx, second.ID); err != nil || !ro.BatchStarted.IsZero() || ro.Counts[model.DeviceQueued] != len(f.devs) {
		t.Fatalf("the rollout was driven while another coordinator held the lock: %+v, %v", ro, err)
	}
	if err := locks.Delete(ctx, engineLockKey); err != nil {
		t.Fatal(err)
	}
	done := f.waitState(second.ID, model.RolloutReverted)
	if done.Counts[model.DeviceReverted] != len(f.devs) {
		t.Fatalf("undone rollout counts %v (%s)", done.Counts, done.Reason)
	}
	for _, d := range f.devs {
		if des := f.desiredOf(d); des == nil || des.ReleaseID != "rel-1" || des.Revert == nil {
			t.Fatalf("%s after the undo: %+v", d.name, des)
		}
	}
}

// The engine reads the fleet's records from the device index, once the
// index has taken in the bucket's last revision: a record written a
// moment before is read as written (a new one, a changed one, a removed
// one, a damaged one as none), by the index itself and not the bucket.
func TestCurrentDevicesReadsTheLatestWrites(t *testing.T) {
	f := startRolloutFleet(t, 1, "developers")
	ctx := ctxT(t, 30*time.Second)
	kv := bucketOf(ctx, t, f.c, subjects.BucketDevices)
	find := func(rev uint64, id string) *model.Device {
		t.Helper()
		if last, err := f.c.rollouts.lastRevision(ctx, subjects.BucketDevices); err != nil || last != rev {
			t.Fatalf("last revision %d (%v), want %d", last, err, rev)
		}
		ictx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		devs, err := f.c.index.devicesAsOf(ictx, rev)
		if err != nil {
			t.Fatal(err)
		}
		for i := range devs {
			if devs[i].ID == id {
				return &devs[i]
			}
		}
		return nil
	}
	for i := range 50 {
		kp, _ := nkeys.CreateUser()
		id, _ := kp.PublicKey()
		rec := model.Device{ID: id, Name: fmt.Sprintf("late-%02d", i), Groups: []string{"developers"}, Status: model.DeviceActive}
		b, _ := json.Marshal(rec)
		rev, err := kv.Put(ctx, id, b)
		if err != nil {
			t.Fatal(err)
		}
		if d := find(rev, id); d == nil || d.Name != rec.Name || d.Status != model.DeviceActive {
			t.Fatalf("round %d: a device recorded a moment before reads as %+v", i, d)
		}
		rec.Status = model.DeviceRevoked
		b, _ = json.Marshal(rec)
		if rev, err = kv.Put(ctx, id, b); err != nil {
			t.Fatal(err)
		}
		if d := find(rev, id); d == nil || d.Status != model.DeviceRevoked {
			t.Fatalf("round %d: a device revoked a moment before reads as %+v", i, d)
		}
		if rev, err = kv.Put(ctx, id, []byte("{damaged")); err != nil {
			t.Fatal(err)
		}
		if d := find(rev, id); d != nil {
			t.Fatalf("round %d: a damaged record reads as %+v (a read of the bucket skips it)", i, d)
		}
		if err := kv.Delete(ctx, id); err != nil {
			t.Fatal(err)
		}
		e, err := lastEntry(ctx, kv, id)
		if err != nil {
			t.Fatal(err)
		}
		if d := find(e.Revision(), id); d != nil {
			t.Fatalf("round %d: a device removed a moment before reads as %+v", i, d)
		}
	}
	if devs, err := f.c.rollouts.currentDevices(ctx); err != nil || len(devs) != len(f.devs) {
		t.Fatalf("current devices: %d (%v), want %d", len(devs), err, len(f.devs))
	}

	// Delete markers compacted away: the stream's last sequence stays
	// where it was, but an index started since reaches the last entry
	// there is.
	if err := kv.PurgeDeletes(ctx, jetstream.DeleteMarkersOlderThan(-1)); err != nil {
		t.Fatal(err)
	}
	fresh := newDeviceIndex(zerolog.Nop())
	fctx, stop := context.WithCancel(ctx)
	defer stop()
	if err := fresh.run(fctx, f.c.JetStream()); err != nil {
		t.Fatal(err)
	}
	rev, err := f.c.rollouts.lastRevision(ctx, subjects.BucketDevices)
	if err != nil {
		t.Fatal(err)
	}
	ictx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if devs, err := fresh.devicesAsOf(ictx, rev); err != nil || len(devs) != len(f.devs) {
		t.Fatalf("an index started after a compaction: %d devices (%v), want %d", len(devs), err, len(f.devs))
	}
}

// Likewise for desired states (what a new rollout keeps to revert to): a
// value written a moment before is read as stored, and a deleted one is
// gone.
func TestCurrentDesiredReadsTheLatestWrites(t *testing.T) {
	f := startRolloutFleet(t, 1, "developers")
	ctx := ctxT(t, 30*time.Second)
	kv := bucketOf(ctx, t, f.c, subjects.BucketDesired)
	id := f.devs[0].id
	for i := range 50 {
		b, _ := json.Marshal(model.Desired{Device: id, ReleaseID: fmt.Sprintf("rel-%02d", i), RolloutID: "r1", StorePath: storePath(fmt.Sprintf("gen-%d", i))})
		if _, err := kv.Put(ctx, id, b); err != nil {
			t.Fatal(err)
		}
		rev, err := f.c.rollouts.lastRevision(ctx, subjects.BucketDesired)
		if err != nil {
			t.Fatal(err)
		}
		ictx, cancel := context.WithTimeout(ctx, 2*time.Second)
		got, err := f.c.index.desiredAsOf(ictx, rev)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if p, ok := got[id]; !ok || string(p.value) != string(b) || p.ref.ReleaseID != fmt.Sprintf("rel-%02d", i) || p.ref.StorePath != storePath(fmt.Sprintf("gen-%d", i)) {
			t.Fatalf("round %d: a desired state written a moment before reads as %+v", i, got[id])
		}
		if err := kv.Delete(ctx, id); err != nil {
			t.Fatal(err)
		}
		if rev, err = f.c.rollouts.lastRevision(ctx, subjects.BucketDesired); err != nil {
			t.Fatal(err)
		}
		ictx, cancel = context.WithTimeout(ctx, 2*time.Second)
		got, err = f.c.index.desiredAsOf(ictx, rev)
		cancel()
		if err != nil || got[id].value != nil {
			t.Fatalf("round %d: a desired state deleted a moment before reads as %+v (%v)", i, got[id], err)
		}
	}
}

// holdEngine has another coordinator take the engine lock, as after a
// partition, and waits until this one stops leading. The lock lapses
// with the bucket's TTL unless the test deletes it first.
func holdEngine(ctx context.Context, t *testing.T, f *rolloutFleet) jetstream.KeyValue {
	t.Helper()
	locks := bucketOf(ctx, t, f.c, subjects.BucketLocks)
	if _, err := locks.Put(ctx, engineLockKey, []byte("another-coordinator")); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 2*engineLockRenew, "the engine stepping down", func() bool { return !f.c.rollouts.leading.Load() })
	return locks
}

// bucketOf opens one of the coordinator's buckets.
func bucketOf(ctx context.Context, t *testing.T, c *Coordinator, name string) jetstream.KeyValue {
	t.Helper()
	kv, err := c.JetStream().KeyValue(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	return kv
}
