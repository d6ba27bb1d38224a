package broker

import (
	"strings"
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

// Two deploys of the same devices at the same moment (as on two
// coordinators): both may pass the check for unfinished rollouts, but only
// one claims the devices; the other is refused and drives nothing.
func TestConcurrentDeploysClaimOnce(t *testing.T) {
	f := startRolloutFleet(t, 3, "developers")
	ctx := ctxT(t, 60*time.Second)
	f.release("rel-a", storePath("a"))
	f.release("rel-b", storePath("b"))
	locks, err := f.c.JetStream().KeyValue(ctx, subjects.BucketLocks)
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, "the engine leading", func() bool { return f.c.rollouts.leading.Load() })
	for round := range 3 {
		// Hold the engine (another coordinator has the lock): no rollout
		// can finish between the two deploys and free the devices, so
		// exactly one may win.
		if _, err := locks.Put(ctx, engineLockKey, []byte("another-coordinator")); err != nil {
			t.Fatal(err)
		}
		poll.Until(t, 2*engineLockRenew, "the engine stepping down", func() bool { return !f.c.rollouts.leading.Load() })
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
