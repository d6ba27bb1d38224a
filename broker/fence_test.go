package broker

import (
	"testing"
	"time"

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
	locks, err := f.c.JetStream().KeyValue(ctx, subjects.BucketLocks)
	if err != nil {
		t.Fatal(err)
	}
	// Another coordinator's lock replaces ours (as after a partition).
	if _, err := locks.Put(ctx, engineLockKey, []byte("another-coordinator")); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 2*engineLockRenew, "the engine stepping down", func() bool { return !f.c.rollouts.leading.Load() })
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
