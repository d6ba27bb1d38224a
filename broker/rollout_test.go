package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/admin"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// rolloutFleet is a coordinator with simulated devices. Each device is a
// real NATS client holding real agent credentials, so it can only do what an
// agent may; it answers each desired state with the result its fail func
// picks, the way an agent reports after applying.
type rolloutFleet struct {
	t      *testing.T
	c      *Coordinator
	admin  nkeys.KeyPair
	devs   []*simDevice
	byName map[string]*simDevice
}

type simDevice struct {
	id, name string
	nc       *nats.Conn
	// applied counts desired states acted on, per store path.
	mu      sync.Mutex
	applied map[string]int
	fail    atomic.Pointer[string] // store path that fails, if any
}

func startRolloutFleet(t *testing.T, n int, group string) *rolloutFleet {
	t.Helper()
	cfg := DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Listen = "127.0.0.1:0"
	cfg.HTTP = ""
	ctx := context.Background()
	c, err := Start(ctx, cfg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	admin, _ := nkeys.CreateUser()
	f := &rolloutFleet{t: t, c: c, admin: admin, byName: map[string]*simDevice{}}
	devKV, _ := c.JetStream().KeyValue(ctx, subjects.BucketDevices)
	for i := range n {
		name := fmt.Sprintf("dev%02d", i)
		cr, err := c.Authority().NewUser(subjects.RoleAgent, name, 0)
		if err != nil {
			t.Fatal(err)
		}
		d := &simDevice{id: cr.PublicKey(), name: name, applied: map[string]int{}}
		rec := model.Device{ID: d.id, Name: name, Groups: []string{group}, Status: model.DeviceActive, EnrolledAt: time.Now()}
		b, _ := json.Marshal(rec)
		if _, err := devKV.Put(ctx, d.id, b); err != nil {
			t.Fatal(err)
		}
		d.connect(t, c, cr)
		f.devs = append(f.devs, d)
		f.byName[name] = d
	}
	return f
}

func (d *simDevice) connect(t *testing.T, c *Coordinator, cr *accounts.Creds) {
	seed, _ := cr.Key.Seed()
	nc, err := nats.Connect(c.ClientURL(), nats.UserJWTAndSeed(cr.JWT, string(seed)),
		nats.CustomInboxPrefix(cr.InboxPrefix()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	d.nc = nc
	// Like an agent: a trigger asks it to read its desired state, and it
	// answers with a signed event.
	_, err = nc.Subscribe(subjects.DeviceNotify(cr.Site(), d.id), func(*nats.Msg) {
		m, err := nc.Request(subjects.DesiredGetFor(d.id), nil, 5*time.Second)
		if err != nil {
			if !nc.IsClosed() {
				t.Errorf("%s: read desired state: %v", d.name, err)
			}
			return
		}
		var r model.DesiredReply
		var des model.Desired
		if json.Unmarshal(m.Data, &r) != nil || json.Unmarshal(r.Desired, &des) != nil || des.StorePath == "" {
			return
		}
		d.mu.Lock()
		d.applied[des.StorePath]++
		d.mu.Unlock()
		res := model.ResultSucceeded
		if p := d.fail.Load(); p != nil && *p == des.StorePath {
			res = model.ResultRolledBack
		}
		ev := model.Event{Device: d.id, Time: time.Now(), State: model.StateReporting, Result: res,
			RolloutID: des.RolloutID, ReleaseID: des.ReleaseID, StorePath: des.StorePath, Attempt: fmt.Sprint(r.Seq)}
		if res != model.ResultSucceeded {
			ev.Check, ev.Error = "http-health", "health check failed"
		}
		// A connection closed by the test's end is not the device's fault.
		if err := reportSigned(nc, cr.Key, subjects.DeviceEvents(d.id), model.PurposeEvent, ev); err != nil && !nc.IsClosed() {
			t.Errorf("%s: publish event: %v", d.name, err)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

// reportSigned sends v signed by kp as a device report and waits for the
// coordinator's acknowledgement.
func reportSigned(nc *nats.Conn, kp nkeys.KeyPair, subj, purpose string, v any) error {
	s, err := model.Sign(kp, purpose, v)
	if err != nil {
		return err
	}
	b, _ := json.Marshal(s)
	m, err := nc.Request(subj, b, 10*time.Second)
	if err != nil {
		return err
	}
	var ack model.ReportAck
	if err := json.Unmarshal(m.Data, &ack); err != nil {
		return err
	}
	if ack.Error != "" {
		return fmt.Errorf("coordinator: %s", ack.Error)
	}
	return nil
}

func (d *simDevice) appliedCount(path string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.applied[path]
}

// storePath makes a well-formed store path for name.
func storePath(name string) string {
	return "/nix/store/" + strings.Repeat("a", 31) + "b-" + name
}

func (f *rolloutFleet) release(id, path string) {
	f.t.Helper()
	pub, _ := f.admin.PublicKey()
	rel := model.Release{ID: id, CreatedAt: time.Now().UTC(), Author: pub, Default: path}
	s, err := model.Sign(f.admin, model.PurposeRelease, rel)
	if err != nil {
		f.t.Fatal(err)
	}
	b, _ := json.Marshal(s)
	kv, _ := f.c.JetStream().KeyValue(context.Background(), subjects.BucketReleases)
	if _, err := kv.Create(context.Background(), id, b); err != nil {
		f.t.Fatal(err)
	}
}

// waitState waits until the rollout reaches state, or fails the test.
func (f *rolloutFleet) waitState(id string, want model.RolloutState) *model.Rollout {
	f.t.Helper()
	var ro *model.Rollout
	poll.Telling(f.t, 30*time.Second, "rollout "+id+" "+string(want), func() (bool, string) {
		got, _, err := f.c.rollouts.Get(context.Background(), id)
		if err != nil {
			return false, err.Error()
		}
		ro = got
		if ro.State.Finished() && ro.State != want {
			f.t.Fatalf("rollout %s ended %s, want %s: %+v", id, ro.State, want, ro)
		}
		return ro.State == want, fmt.Sprintf("%+v", ro)
	})
	return ro
}

func (f *rolloutFleet) desiredOf(d *simDevice) *model.Desired {
	kv, _ := f.c.JetStream().KeyValue(context.Background(), subjects.BucketDesired)
	e, err := kv.Get(context.Background(), d.id)
	if err != nil {
		return nil
	}
	var des model.Desired
	if json.Unmarshal(e.Value(), &des) != nil {
		return nil
	}
	return &des
}

func TestRolloutStagedSucceeds(t *testing.T) {
	f := startRolloutFleet(t, 20, "developers")
	gen2 := storePath("gen2")
	f.release("rel-2", gen2)
	ro, err := f.c.rollouts.Create(context.Background(), model.DeployRequest{
		ReleaseID: "rel-2", Group: "developers", Strategy: "staged", Batches: "1,50%,100%", MaxFailures: "0",
	}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(ro.BatchSizes); got != "[1 9 10]" {
		t.Fatalf("batch sizes %s, want [1 9 10]", got)
	}
	done := f.waitState(ro.ID, model.RolloutSucceeded)
	if done.Counts[model.DeviceSucceeded] != 20 {
		t.Fatalf("counts %v", done.Counts)
	}
	for _, d := range f.devs {
		if des := f.desiredOf(d); des == nil || des.StorePath != gen2 || des.RolloutID != ro.ID {
			t.Fatalf("%s desired %+v", d.name, des)
		}
		if n := d.appliedCount(gen2); n != 1 {
			t.Fatalf("%s applied gen2 %d times", d.name, n)
		}
	}
}

// A batch starts from the claims its rollout took at creation unless
// fleet_claims was written since; then it reads them all.
func TestBatchClaimsReadOnlyAfterAWrite(t *testing.T) {
	f := startRolloutFleet(t, 4, "developers")
	ctx := context.Background()
	f.release("rel-2", storePath("gen2"))
	claims := bucketOf(ctx, t, f.c, subjects.BucketClaims)
	if _, err := claims.Put(ctx, "UBEFORE", []byte("r-other")); err != nil {
		t.Fatal(err)
	}
	for _, d := range f.devs {
		d.nc.Close() // offline: the rollout waits, nothing else claims
	}
	res, err := f.c.rollouts.Create(ctx, model.DeployRequest{ReleaseID: "rel-2", Group: "developers", Strategy: "all", HealthTimeout: "1h"}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	ro := res.Rollout
	r := f.c.rollouts
	r.mu.Lock()
	c := r.cache[ro.ID]
	r.mu.Unlock()
	if c == nil || c.claimsSeq == 0 {
		t.Fatalf("the engine's cache of a rollout created here holds no claim sequence: %+v", c)
	}
	devs, err := r.Devices(ctx, ro)
	if err != nil {
		t.Fatal(err)
	}
	check := func(got map[string]string, wantOthers ...string) {
		t.Helper()
		for _, d := range devs {
			if got[d.Device] != ro.ID {
				t.Errorf("claim of %s: %q, want %s", d.Name, got[d.Device], ro.ID)
			}
		}
		if len(got) != len(devs)+len(wantOthers) {
			t.Errorf("%d claims %v, want the rollout's %d and %v", len(got), got, len(devs), wantOthers)
		}
		for _, k := range wantOthers {
			if _, ok := got[k]; !ok {
				t.Errorf("claims %v: no %s (the bucket was not read)", got, k)
			}
		}
	}
	got, err := r.batchClaims(ctx, ro.ID, c, devs)
	if err != nil {
		t.Fatal(err)
	}
	check(got) // the claim written before the rollout's was not read
	if _, err := claims.Put(ctx, "UAFTER", []byte("r-other")); err != nil {
		t.Fatal(err)
	}
	if got, err = r.batchClaims(ctx, ro.ID, c, devs); err != nil {
		t.Fatal(err)
	}
	check(got, "UBEFORE", "UAFTER")
	// Created elsewhere (no cache): always read.
	if got, err = r.batchClaims(ctx, ro.ID, nil, devs); err != nil {
		t.Fatal(err)
	}
	check(got, "UBEFORE", "UAFTER")
}

// A device another rollout claimed after this one was created here is
// not driven by this one's next batch: it is marked superseded, its
// desired state left alone.
func TestBatchSkipsADeviceClaimedSinceCreation(t *testing.T) {
	f := startRolloutFleet(t, 3, "developers")
	ctx := context.Background()
	f.release("rel-2", storePath("gen2"))
	for _, d := range f.devs {
		d.nc.Close() // offline: batch 1 times out, then batch 2 starts
	}
	res, err := f.c.rollouts.Create(ctx, model.DeployRequest{ReleaseID: "rel-2", Group: "developers", Strategy: "staged",
		Batches: "1,100%", MaxFailures: "1", HealthTimeout: "2s"}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	ro := res.Rollout
	devs, err := f.c.rollouts.Devices(ctx, ro)
	if err != nil {
		t.Fatal(err)
	}
	var later *model.RolloutDevice
	for _, d := range devs {
		if d.Batch == 1 {
			later = d
		}
	}
	if later == nil {
		t.Fatalf("no device in batch 2: %+v", devs)
	}
	claims := bucketOf(ctx, t, f.c, subjects.BucketClaims)
	if _, err := claims.Put(ctx, later.Device, []byte("r-other")); err != nil {
		t.Fatal(err)
	}
	poll.Telling(t, 30*time.Second, "batch 2 starts and skips "+later.Name, func() (bool, string) {
		d, err := f.c.rollouts.getDevice(ctx, ro.ID, later.Device)
		if err != nil {
			return false, err.Error()
		}
		return d.State == model.DeviceSuperseded && strings.Contains(d.Error, "r-other"), fmt.Sprintf("%+v", d)
	})
	if des := f.desiredOf(&simDevice{id: later.Device}); des != nil && des.RolloutID == ro.ID {
		t.Fatalf("%s was claimed by another rollout, yet this one wrote its desired state: %+v", later.Name, des)
	}
}

// A deploy refused a claim after it took its first writes nothing that
// stays: its device records and its claims are taken back.
func TestRefusedDeployLeavesNoRecords(t *testing.T) {
	f := startRolloutFleet(t, 4, "developers")
	ctx := context.Background()
	f.release("rel-2", storePath("gen2"))
	// The highest ID, so the lowest (claimed first) is taken: a claim of
	// a rollout still being created (no summary yet) is not taken over.
	ids := make([]string, 0, len(f.devs))
	for _, d := range f.devs {
		ids = append(ids, d.id)
	}
	slices.Sort(ids)
	claims := bucketOf(ctx, t, f.c, subjects.BucketClaims)
	if _, err := claims.Put(ctx, ids[len(ids)-1], []byte("r-being-created")); err != nil {
		t.Fatal(err)
	}
	_, err := f.c.rollouts.Create(ctx, model.DeployRequest{ReleaseID: "rel-2", Group: "developers"}, "test", nil)
	if err == nil || !strings.Contains(err.Error(), "r-being-created") {
		t.Fatalf("deploy over a device claimed by a rollout being created: %v", err)
	}
	rollouts := bucketOf(ctx, t, f.c, subjects.BucketRollouts)
	keys, err := rollouts.ListKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for k := range keys.Keys() {
		t.Errorf("a refused deploy left %s in %s", k, subjects.BucketRollouts)
	}
	for _, id := range ids[:len(ids)-1] {
		if e, err := claims.Get(ctx, id); err == nil {
			t.Errorf("a refused deploy kept its claim of %s: %s", id, e.Value())
		}
	}
}

func TestRolloutPausesOnFailureAndResumes(t *testing.T) {
	f := startRolloutFleet(t, 10, "developers")
	gen2 := storePath("gen2")
	f.release("rel-2", gen2)
	// Batches 1 | 4 | 5 with devices in name order: dev03 is in batch 2.
	bad := f.byName["dev03"]
	bad.fail.Store(&gen2)
	ro, err := f.c.rollouts.Create(context.Background(), model.DeployRequest{
		ReleaseID: "rel-2", Group: "developers", Batches: "1,50%,100%", MaxFailures: "0",
	}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	paused := f.waitState(ro.ID, model.RolloutPaused)
	if paused.Batch != 1 || !strings.Contains(paused.Reason, "1 device(s) failed") {
		t.Fatalf("paused at batch %d: %s", paused.Batch, paused.Reason)
	}
	for _, d := range f.devs[5:] {
		if f.desiredOf(d) != nil {
			t.Fatalf("%s in a later batch got a desired state while paused", d.name)
		}
	}
	devs, _ := f.c.rollouts.Devices(context.Background(), paused)
	if devs[3].State != model.DeviceFailed || !strings.Contains(devs[3].Error, "http-health") {
		t.Fatalf("failing device recorded as %+v", devs[3])
	}
	// Resuming a paused rollout retries the failed device; fixed, it passes.
	bad.fail.Store(nil)
	if _, err := f.c.rollouts.Transition(context.Background(), model.RolloutRef{ID: ro.ID, Action: "resume"}, nil); err != nil {
		t.Fatal(err)
	}
	f.waitState(ro.ID, model.RolloutSucceeded)
	if n := bad.appliedCount(gen2); n != 2 {
		t.Fatalf("failed device applied %d times, want 2 (first try, retry)", n)
	}
	if _, err := f.c.rollouts.Transition(context.Background(), model.RolloutRef{ID: ro.ID, Action: "resume"}, nil); err == nil {
		t.Fatal("resume of a finished rollout succeeded")
	}
}

func TestRolloutRevertsEarlierBatches(t *testing.T) {
	f := startRolloutFleet(t, 6, "developers")
	gen1, gen2 := storePath("gen1"), storePath("gen2")
	f.release("rel-1", gen1)
	f.release("rel-2", gen2)
	first, err := f.c.rollouts.Create(context.Background(), model.DeployRequest{ReleaseID: "rel-1", Group: "developers", Strategy: "all"}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	f.waitState(first.ID, model.RolloutSucceeded)

	f.byName["dev02"].fail.Store(&gen2)
	ro, err := f.c.rollouts.Create(context.Background(), model.DeployRequest{
		ReleaseID: "rel-2", Group: "developers", Batches: "1,50%,100%", OnFailure: "revert",
	}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	f.waitState(ro.ID, model.RolloutReverted)
	for _, d := range f.devs[:3] {
		des := f.desiredOf(d)
		if des == nil || des.StorePath != gen1 {
			t.Fatalf("%s not reverted to gen1: %+v", d.name, des)
		}
	}
	for _, d := range f.devs[3:] {
		if des := f.desiredOf(d); des == nil || des.StorePath != gen1 || d.appliedCount(gen2) != 0 {
			t.Fatalf("%s of a later batch was touched: %+v", d.name, des)
		}
	}
}

func TestRolloutBadRequests(t *testing.T) {
	f := startRolloutFleet(t, 3, "developers")
	f.release("rel-2", storePath("gen2"))
	ctx := context.Background()
	cases := []struct {
		req  model.DeployRequest
		want string
	}{
		{model.DeployRequest{ReleaseID: "rel-2", Group: "developers", Batches: "0"}, "reaches nobody"},
		{model.DeployRequest{ReleaseID: "rel-2", Group: "developers", Batches: "150%"}, "0% to 100%"},
		{model.DeployRequest{ReleaseID: "rel-2", Group: "developers", Batches: "x"}, "neither a device count"},
		{model.DeployRequest{ReleaseID: "rel-2", Group: "developers", Strategy: "bogus"}, "unknown strategy"},
		{model.DeployRequest{ReleaseID: "rel-2", Group: "nobody"}, "no active devices"},
		{model.DeployRequest{ReleaseID: "nope", Group: "developers"}, "does not exist"},
		{model.DeployRequest{ReleaseID: "rel-2"}, "name the target"},
		{model.DeployRequest{ReleaseID: "rel-2", Group: "developers", HealthTimeout: "-1s"}, "positive duration"},
		{model.DeployRequest{ReleaseID: "rel-2", Group: "developers", MaxFailures: "lots"}, "--max-failures"},
	}
	for _, tc := range cases {
		_, err := f.c.rollouts.Create(ctx, tc.req, "test", nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: error %v, want %q", tc.req, err, tc.want)
		}
	}
	list, err := f.c.rollouts.List(ctx)
	if err != nil {
		t.Fatalf("list rollouts after the bad requests: %v", err)
	}
	if len(list) != 0 {
		t.Fatalf("bad requests left %d rollouts behind", len(list))
	}

	// A device stuck in one rollout is not taken by another unless superseded.
	for _, d := range f.devs {
		d.nc.Close() // offline: the first rollout waits
	}
	first, err := f.c.rollouts.Create(ctx, model.DeployRequest{ReleaseID: "rel-2", Group: "developers", Strategy: "all", HealthTimeout: "1h"}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, "first rollout waiting on every device", func() bool {
		ro, _, _ := f.c.rollouts.Get(ctx, first.ID)
		return ro.Counts[model.DeviceWaiting] == 3
	})
	if _, err := f.c.rollouts.Create(ctx, model.DeployRequest{ReleaseID: "rel-2", Group: "developers"}, "test", nil); err == nil || !strings.Contains(err.Error(), "--supersede") {
		t.Fatalf("second rollout on busy devices: %v", err)
	}
	second, err := f.c.rollouts.Create(ctx, model.DeployRequest{ReleaseID: "rel-2", Group: "developers", Supersede: true}, "test", nil)
	if err != nil {
		t.Fatalf("superseding rollout: %v", err)
	}
	ro, _, _ := f.c.rollouts.Get(ctx, first.ID)
	devs, err := f.c.rollouts.Devices(ctx, ro)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		if d.State != model.DeviceSuperseded || !strings.Contains(d.Error, second.ID) {
			t.Fatalf("first rollout's %s: %+v", d.Name, d)
		}
	}
	// The engine drives the superseded rollout to its end: nothing waits.
	poll.Until(t, 10*time.Second, "superseded rollout finishes", func() bool {
		ro, _, _ := f.c.rollouts.Get(ctx, first.ID)
		return ro.State.Finished() && ro.Counts[model.DeviceWaiting] == 0
	})
}

// A device revoked while its rollout waits is skipped when its batch
// starts, not failed; a failed device of a paused rollout is still taken
// (resume retries it), so another rollout needs --supersede for it.
func TestRolloutSkipsGoneDevicesAndHoldsFailedOnes(t *testing.T) {
	f := startRolloutFleet(t, 6, "developers")
	ctx := context.Background()
	gen2 := storePath("gen2")
	f.release("rel-2", gen2)
	f.release("rel-3", storePath("gen3"))
	bad := f.byName["dev02"] // batch 2 of 1 | 2 | 3
	bad.fail.Store(&gen2)
	ro, err := f.c.rollouts.Create(ctx, model.DeployRequest{ReleaseID: "rel-2", Group: "developers", Batches: "1,50%,100%"}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	f.waitState(ro.ID, model.RolloutPaused)

	if _, err := f.c.rollouts.Create(ctx, model.DeployRequest{ReleaseID: "rel-3", Devices: []string{bad.id}}, "test", nil); err == nil || !strings.Contains(err.Error(), "--supersede") {
		t.Fatalf("a failed device of a paused rollout was taken by another: %v", err)
	}

	// dev05 (batch 3) is revoked meanwhile.
	gone := f.byName["dev05"]
	devKV, _ := f.c.JetStream().KeyValue(ctx, subjects.BucketDevices)
	e, _ := devKV.Get(ctx, gone.id)
	var rec model.Device
	_ = json.Unmarshal(e.Value(), &rec)
	rec.Status = model.DeviceRevoked
	b, _ := json.Marshal(rec)
	if _, err := devKV.Put(ctx, gone.id, b); err != nil {
		t.Fatal(err)
	}
	bad.fail.Store(nil)
	if _, err := f.c.rollouts.Transition(ctx, model.RolloutRef{ID: ro.ID, Action: "resume"}, nil); err != nil {
		t.Fatal(err)
	}
	done := f.waitState(ro.ID, model.RolloutSucceeded)
	if done.Counts[model.DeviceSkipped] != 1 || done.Counts[model.DeviceSucceeded] != 5 {
		t.Fatalf("counts %v", done.Counts)
	}
	if f.desiredOf(gone) != nil || gone.appliedCount(gen2) != 0 {
		t.Fatal("the revoked device got a desired state")
	}
}

// An operator limited to a group acts only on rollouts within its groups,
// also when the rollout names devices rather than a group.
func TestGroupOperatorActsOnlyOnItsRollouts(t *testing.T) {
	f := startRolloutFleet(t, 2, "developers")
	ctx := context.Background()
	f.release("rel-2", storePath("gen2"))
	for _, d := range f.devs {
		d.nc.Close() // offline: the rollout keeps waiting
	}
	ro, err := f.c.rollouts.Create(ctx, model.DeployRequest{ReleaseID: "rel-2", Devices: []string{f.devs[0].id, f.devs[1].id}, HealthTimeout: "1h"}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	cr, err := f.c.Authority().NewUser(subjects.RoleOperator, "quinn", 0)
	if err != nil {
		t.Fatal(err)
	}
	kv, _ := f.c.JetStream().KeyValue(ctx, subjects.BucketAdmins)
	b, _ := json.Marshal(model.Admin{Key: cr.PublicKey(), Name: "quinn", Role: "operator", Groups: []string{"qa"}})
	if _, err := kv.Put(ctx, cr.PublicKey(), b); err != nil {
		t.Fatal(err)
	}
	cl, err := admin.DialCreds(ctx, f.c.ClientURL(), cr)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	err = cl.Call(ctx, subjects.VerbRolloutAction, true, model.RolloutRef{ID: ro.ID, Action: "abort"}, nil)
	if err == nil || !strings.Contains(err.Error(), "may not assign group developers") {
		t.Fatalf("qa operator aborting a developers rollout: %v", err)
	}
	if got, _, _ := f.c.rollouts.Get(ctx, ro.ID); got.State.Finished() {
		t.Fatalf("rollout %s", got.State)
	}
}

// A batch of a thousand devices or more is told to pace its reports, the
// facts spread to come at about paceFactsRate a second; a smaller one
// reports as it goes.
func TestPaceForBatch(t *testing.T) {
	if p := paceFor(paceFrom - 1); p != nil {
		t.Fatalf("batch of %d: pace %+v, want none", paceFrom-1, p)
	}
	for _, c := range []struct {
		n     int
		splay time.Duration
	}{
		{paceFrom, 2 * time.Second},
		{10000, 20 * time.Second},
		{1000000, model.MaxFactsSplay},
	} {
		p := paceFor(c.n)
		if p == nil || p.ProgressAfter() != paceProgressAfter || p.FactsSplay() != c.splay {
			t.Fatalf("batch of %d: pace %+v, want progress after %v, facts within %v", c.n, p, paceProgressAfter, c.splay)
		}
		r := model.DesiredReply{}
		if err := json.Unmarshal(announcement{id: "d", seq: 3, value: []byte(`{"a": [1, "}"]}`)}.trigger(p), &r); err != nil || r.Pace == nil || *r.Pace != *p ||
			r.Seq != 3 || string(r.Desired) != `{"a": [1, "}"]}` {
			t.Fatalf("batch of %d: trigger carries %+v (%v), want %+v", c.n, r.Pace, err, p)
		}
	}
}
