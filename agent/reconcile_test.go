package agent

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"fleet/model"
	"fleet/subjects"
)

// runningActivator reports path as the running system and fails the test
// on anything that would change the system.
type runningActivator struct {
	t    *testing.T
	path string
}

func (f runningActivator) Current(context.Context) (string, error) { return f.path, nil }
func (f runningActivator) Fetch(context.Context, string, string) error {
	f.t.Error("unexpected Fetch")
	return nil
}
func (f runningActivator) Snapshot(context.Context) (Generation, error) {
	f.t.Error("unexpected Snapshot")
	return Generation{}, nil
}
func (f runningActivator) Switch(context.Context, string, model.Action) error {
	f.t.Error("unexpected Switch")
	return nil
}
func (f runningActivator) Rollback(context.Context, Generation, model.Action) error {
	f.t.Error("unexpected Rollback")
	return nil
}
func (f runningActivator) Active(_ context.Context, path string, action model.Action) (bool, error) {
	return path == f.path && action == model.ActionSwitch, nil
}

func waitFor[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// The agent reads its desired state from the coordinator on start and again
// on a trigger in its own inbox (whatever the trigger carries), handles it,
// and reports signed events and facts that the coordinator acknowledges.
func TestAgentReadsDesiredOnTrigger(t *testing.T) {
	nc, coord := natsPair(t)
	kp, id := deviceKey(t)
	admin, adminPub := deviceKey(t)
	const site = "berlin"
	path := "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-host"

	rel, err := model.Sign(admin, model.PurposeRelease, model.Release{ID: "r1", CreatedAt: time.Now().UTC(), Author: adminPub, Default: path})
	if err != nil {
		t.Fatal(err)
	}
	deploy, err := model.SignRequest(admin, "deploy", model.DeployRequest{ReleaseID: "r1", Devices: []string{id}}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	desired := model.Desired{Device: id, ReleaseID: "r1", RolloutID: "ro1", StorePath: path, Release: rel, IssuedAt: time.Now().UTC(), Deploy: &deploy}
	desiredJSON, _ := json.Marshal(desired)

	// The coordinator: desired-state reads, events, facts.
	var (
		mu     sync.Mutex
		answer model.DesiredReply // none at first
	)
	asks := make(chan struct{}, 10)
	if _, err := coord.Subscribe(subjects.DesiredGetFor(id), func(m *nats.Msg) {
		mu.Lock()
		a := answer
		mu.Unlock()
		asks <- struct{}{}
		respondJSON(t, m, a)
	}); err != nil {
		t.Fatal(err)
	}
	events := serveEvents(t, coord, id)
	events.setAck(model.ReportAck{Seq: 1})
	facts := make(chan *model.Facts, 10)
	if _, err := coord.Subscribe(subjects.DeviceFacts(id), func(m *nats.Msg) {
		f, err := model.ParseFacts(m.Data, id)
		if err != nil {
			t.Errorf("facts: %v", err)
			respondJSON(t, m, model.ReportAck{Error: err.Error(), Permanent: true})
			return
		}
		facts <- f
		respondJSON(t, m, model.ReportAck{Seq: 1})
	}); err != nil {
		t.Fatal(err)
	}
	if err := coord.Flush(); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	a, err := New(Options{DeviceID: id, Key: kp, Site: site, Hostname: "host", StateDir: dir,
		ReleaseSigners: []string{adminPub}, Activator: runningActivator{t: t, path: path},
		ApplyTimeout: time.Minute, ReconnectWithin: time.Minute, FactsInterval: time.Hour, Recheck: time.Hour,
		Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx, nc) }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := waitFor(t, done, "the agent to stop"); err != nil {
			t.Errorf("Run: %v", err)
		}
	}
	defer stop()

	// On start the agent asks once; there is no desired state yet. Its
	// trigger subscription was sent before that request, so the server has
	// it by now.
	waitFor(t, asks, "the first desired-state read")
	mu.Lock()
	answer = model.DesiredReply{Seq: 5, Desired: desiredJSON}
	mu.Unlock()
	if err := coord.Publish(subjects.DeviceNotify(site, id), []byte("not a state: the agent reads it")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, asks, "the desired-state read after the trigger")

	// The device already runs the release: checking, then reporting
	// unchanged (which ends the apply), each signed and stored.
	want := []struct {
		state  model.State
		result model.Result
	}{{model.StateChecking, ""}, {model.StateReporting, model.ResultUnchanged}}
	var attempt string
	for i, w := range want {
		ev := waitFor(t, events.stored, "event "+string(w.state))
		if ev.State != w.state || ev.Result != w.result || ev.ReleaseID != "r1" || ev.RolloutID != "ro1" || ev.StorePath != path || ev.Attempt == "" {
			t.Fatalf("event %d: %+v, want %s %s", i, ev, w.state, w.result)
		}
		if i > 0 && ev.Attempt != attempt {
			t.Fatalf("event %d of another attempt: %s, want %s", i, ev.Attempt, attempt)
		}
		attempt = ev.Attempt
	}
	// Fresh facts follow the apply, carrying its result.
	for f := waitFor(t, facts, "facts"); f.LastApply == nil || f.LastApply.Result != model.ResultUnchanged; f = waitFor(t, facts, "facts after the apply") {
	}

	// A trigger that carries a newer state is taken as it is, without a
	// read; one older than what the agent took is skipped.
	desired2 := desired
	desired2.IssuedAt = desired.IssuedAt.Add(time.Second)
	desired2JSON, _ := json.Marshal(desired2)
	for _, r := range []model.DesiredReply{{Seq: 9, Desired: desired2JSON}, {Seq: 7, Desired: desiredJSON}} {
		b, _ := json.Marshal(r)
		if err := coord.Publish(subjects.DeviceNotify(site, id), b); err != nil {
			t.Fatal(err)
		}
	}
	for i, w := range want {
		ev := waitFor(t, events.stored, "pushed state's event "+string(w.state))
		if ev.State != w.state || ev.Result != w.result || ev.Attempt == attempt {
			t.Fatalf("pushed state's event %d: %+v, want %s %s of a new attempt", i, ev, w.state, w.result)
		}
	}
	if n := len(asks); n != 0 {
		t.Fatalf("the agent read its state %d more time(s) after a trigger that carried it", n)
	}

	// A trigger of a large batch paces the apply's reports: the quick
	// apply's checking gives way to its result, and the facts after it
	// still come, within the splay. The pace is not signed (a site's leaf
	// could write one): an absurd wait holds no result back.
	for len(facts) > 0 {
		<-facts
	}
	desired3 := desired
	desired3.IssuedAt = desired.IssuedAt.Add(2 * time.Second)
	desired3JSON, _ := json.Marshal(desired3)
	b, _ := json.Marshal(model.DesiredReply{Seq: 11, Desired: desired3JSON, Pace: &model.Pace{ProgressAfterMS: 1 << 62, FactsSplayMS: 1000}})
	paced := time.Now()
	if err := coord.Publish(subjects.DeviceNotify(site, id), b); err != nil {
		t.Fatal(err)
	}
	if ev := waitFor(t, events.stored, "the paced apply's result"); ev.State != model.StateReporting || ev.Result != model.ResultUnchanged {
		t.Fatalf("paced apply's first event: %+v, want its result alone", ev)
	}
	f := waitFor(t, facts, "facts after the paced apply")
	if f.LastApply == nil || f.LastApply.Time.Before(paced.Add(-time.Second)) {
		t.Fatalf("facts after the paced apply: last apply %+v", f.LastApply)
	}

	stop()
	// Nothing else was reported: the absent state and the stale push
	// caused no event. An
	// event whose ack was in flight at the stop is sent again by the
	// final flush (at least once; the coordinator deduplicates by ID).
	got, bad := events.received()
	ids := map[string]bool{}
	for _, ev := range got {
		ids[model.EventMsgID(&ev)] = true
	}
	if len(ids) != 2*len(want)+1 || len(bad) != 0 {
		t.Fatalf("coordinator got events %+v, refused %v", got, bad)
	}
	st, err := LoadState(dir)
	if err != nil || st.Phase != PhaseNone || st.Last == nil || st.Last.Result != model.ResultUnchanged || st.LastKey != (&DesiredMsg{Desired: &desired3}).Key() {
		t.Fatalf("state after the apply: %+v %v", st, err)
	}
}

// A trigger's sequence counts only once its state is accepted: a forged
// push with a huge sequence (a rogue leaf can write into its site's
// inboxes) is handed to the checks like any state, and does not make the
// agent skip the real states that follow.
func TestForgedTriggerSequenceSkipsNothing(t *testing.T) {
	a := &Agent{wake: make(chan struct{}, 1), log: zerolog.Nop()}
	push := func(seq uint64, rollout string) {
		b, _ := json.Marshal(model.DesiredReply{Seq: seq, Desired: json.RawMessage(`{"rollout_id":"` + rollout + `"}`)})
		a.onNotify(&nats.Msg{Data: b})
	}
	push(1<<60, "forged")
	m, err := a.next(context.Background())
	if err != nil || m == nil || m.Seq != 1<<60 {
		t.Fatalf("forged push: %+v %v, want it handed to the checks", m, err)
	}
	// Not accepted (handle was not reached here, as a refused state is
	// not): the next real state is taken.
	push(7, "real")
	m, err = a.next(context.Background())
	if err != nil || m == nil || m.Seq != 7 || m.Desired.RolloutID != "real" {
		t.Fatalf("real push after a forged one: %+v %v", m, err)
	}
}

// countingActions counts what the commands made the host do.
type countingActions struct{ rollbacks, reboots int }

func (c *countingActions) Reboot(context.Context) error             { c.reboots++; return nil }
func (c *countingActions) Rollback(context.Context) error           { c.rollbacks++; return nil }
func (c *countingActions) ReloadUnit(context.Context, string) error { return nil }

// A rollback command never runs in the middle of an apply: the two would
// switch the profile under each other. It says why, and the admin tries
// again once the apply has finished.
func TestRollbackCommandWaitsForNoApply(t *testing.T) {
	acts := &countingActions{}
	a := &Agent{o: Options{MDM: MDMOptions{Actions: acts}}, wake: make(chan struct{}, 1), factsCh: make(chan struct{}, 1), log: zerolog.Nop()}
	c := &commander{a: a}
	a.applyMu.Lock() // an apply is running
	err := c.run(context.Background(), &model.Command{ID: "c1", Action: model.CommandRollback})
	if err == nil || !strings.Contains(err.Error(), "apply is in progress") || acts.rollbacks != 0 {
		t.Fatalf("rollback during an apply: %v, %d rollbacks; want refused, none", err, acts.rollbacks)
	}
	a.applyMu.Unlock()
}
