package integration

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/agent"
	"fleet/broker"
	"fleet/internal/poll"
	"fleet/internal/promvalue"
	"fleet/model"
	"fleet/nixtest"
	"fleet/subjects"
)

const host = "dev1"

// world is one test's coordinator, Nix sandbox and agent device.
type world struct {
	t        *testing.T
	ctx      context.Context
	coord    *broker.Coordinator
	nix      *nixtest.Env
	admin    nkeys.KeyPair
	device   string
	stateDir string
	cfgFile  string
	events   chan model.Event
	facts    chan model.Facts
	agent    *exec.Cmd
	agentLog *os.File
	seen     []model.Event
	// signers, when set, replace the admin key as --release-signer.
	signers []string
}

func newWorld(t *testing.T) *world {
	t.Helper()
	nixtest.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	cfg := broker.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Listen = "127.0.0.1:0"
	cfg.HTTP = ""
	coord, err := broker.Start(ctx, cfg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(coord.Close)
	nix, err := nixtest.New(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = nix.Close() })
	admin, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	w := &world{t: t, ctx: ctx, coord: coord, nix: nix, admin: admin, stateDir: t.TempDir(),
		events: make(chan model.Event, 1000), facts: make(chan model.Facts, 1000)}
	creds, err := coord.Authority().NewUser(subjects.RoleAgent, host, 0)
	if err != nil {
		t.Fatal(err)
	}
	w.device = creds.PublicKey()
	if err := accounts.WriteCreds(filepath.Join(w.stateDir, agent.CredsFile), creds); err != nil {
		t.Fatal(err)
	}
	// The coordinator hears only devices it has a record of.
	devKV, err := coord.JetStream().KeyValue(ctx, subjects.BucketDevices)
	if err != nil {
		t.Fatal(err)
	}
	rec, _ := json.Marshal(model.Device{ID: w.device, Name: host, Site: subjects.DefaultSite, Status: model.DeviceActive, EnrolledAt: time.Now().UTC()})
	if _, err := devKV.Put(ctx, w.device, rec); err != nil {
		t.Fatal(err)
	}
	fc := agent.FileConfig{
		HealthChecks: []agent.HealthCheck{{
			Name: "no-unhealthy-marker", Type: agent.CheckCommand, Command: nix.UnhealthyCheck(),
			Retries: 1, Interval: agent.Duration(100 * time.Millisecond), Timeout: agent.Duration(5 * time.Second),
		}},
		HealthDeadline: agent.Duration(20 * time.Second),
	}
	b, _ := json.Marshal(fc)
	w.cfgFile = filepath.Join(t.TempDir(), "agent.json")
	if err := os.WriteFile(w.cfgFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	w.watch(subjects.DeviceEvents(w.device), func(data []byte) {
		var ev model.Event
		if json.Unmarshal(data, &ev) == nil {
			w.events <- ev
		}
	})
	w.watch(subjects.DeviceFacts(w.device), func(data []byte) {
		var f model.Facts
		if json.Unmarshal(data, &f) == nil {
			w.facts <- f
		}
	})
	t.Cleanup(func() {
		w.stopAgent(syscall.SIGTERM)
		if t.Failed() {
			if b, err := os.ReadFile(filepath.Join(w.stateDir, "agent.log")); err == nil {
				t.Logf("agent log:\n%s", lastN(string(b), 60))
			}
			t.Logf("switch log: %q", nix.Switches())
			for _, ev := range w.seen {
				t.Logf("event: %+v", ev)
			}
		}
	})
	return w
}

func lastN(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// watch reads a stream subject with an ordered consumer, as the rollout
// engine and dashboards do.
func (w *world) watch(subject string, fn func([]byte)) {
	stream := subjects.StreamEvents
	if strings.HasSuffix(subject, ".facts") {
		stream = subjects.StreamFacts
	}
	c, err := w.coord.JetStream().OrderedConsumer(w.ctx, stream, jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}})
	if err != nil {
		w.t.Fatal(err)
	}
	cc, err := c.Consume(func(m jetstream.Msg) { fn(m.Data()) })
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(cc.Stop)
}

// build builds a test system; published ones exist only in the cache.
func (w *world) build(name string, o nixtest.BuildOpts, key *nixtest.Key) nixtest.System {
	w.t.Helper()
	s, err := w.nix.Build(w.ctx, name, o)
	if err != nil {
		w.t.Fatal(err)
	}
	if key != nil {
		if err := w.nix.Publish(w.ctx, s, *key); err != nil {
			w.t.Fatal(err)
		}
	}
	return s
}

func (w *world) install(s nixtest.System) {
	w.t.Helper()
	if err := w.nix.Install(w.ctx, s); err != nil {
		w.t.Fatal(err)
	}
}

// release signs a manifest naming path for the host.
func (w *world) release(id, path string, signer nkeys.KeyPair) model.Signed {
	w.t.Helper()
	return w.releaseAction(id, path, signer, "")
}

func (w *world) releaseAction(id, path string, signer nkeys.KeyPair, action model.Action) model.Signed {
	w.t.Helper()
	pub, _ := signer.PublicKey()
	r := model.Release{ID: id, CreatedAt: time.Now().UTC(), Author: pub, Action: action,
		Closures: map[string]string{host: path}, Substituter: w.nix.Substituter}
	s, err := model.Sign(signer, model.PurposeRelease, r)
	if err != nil {
		w.t.Fatal(err)
	}
	return s
}

func (w *world) putDesired(d model.Desired) {
	w.t.Helper()
	d.Device = w.device
	d.IssuedAt = time.Now().UTC()
	if d.Deploy == nil {
		// As a deploy does: the admin's signed request travels along.
		st, err := model.SignRequest(w.admin, subjects.VerbDeploy, model.DeployRequest{ReleaseID: d.ReleaseID, Devices: []string{w.device}}, time.Now())
		if err != nil {
			w.t.Fatal(err)
		}
		d.Deploy = &st
	}
	kv, err := w.coord.JetStream().KeyValue(w.ctx, subjects.BucketDesired)
	if err != nil {
		w.t.Fatal(err)
	}
	b, _ := json.Marshal(d)
	if _, err := kv.Put(w.ctx, w.device, b); err != nil {
		w.t.Fatal(err)
	}
}

// repeatDesired writes the device's current desired value again, byte for
// byte, as a new revision, and returns that revision.
func (w *world) repeatDesired() uint64 {
	w.t.Helper()
	kv, err := w.coord.JetStream().KeyValue(w.ctx, subjects.BucketDesired)
	if err != nil {
		w.t.Fatal(err)
	}
	e, err := kv.Get(w.ctx, w.device)
	if err != nil {
		w.t.Fatal(err)
	}
	rev, err := kv.Put(w.ctx, w.device, e.Value())
	if err != nil {
		w.t.Fatal(err)
	}
	return rev
}

// desiredReplies listens, with the device's own creds, on the device's
// inbox and reports the revision of every desired state the coordinator
// hands the agent there.
func (w *world) desiredReplies() <-chan uint64 {
	w.t.Helper()
	path := filepath.Join(w.stateDir, agent.CredsFile)
	cr, err := accounts.ReadCreds(path)
	if err != nil {
		w.t.Fatal(err)
	}
	nc, err := nats.Connect(w.coord.ClientURL(), nats.UserCredentials(path),
		nats.CustomInboxPrefix(cr.InboxPrefix()), nats.NoReconnect())
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(nc.Close)
	revs := make(chan uint64, 100)
	_, err = nc.Subscribe(cr.InboxPrefix()+".>", func(m *nats.Msg) {
		// Facts and event acks land here too; only desired-state
		// replies carry a desired state.
		var r model.DesiredReply
		if json.Unmarshal(m.Data, &r) == nil && len(r.Desired) > 0 {
			select {
			case revs <- r.Seq:
			default:
			}
		}
	})
	if err != nil {
		w.t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		w.t.Fatal(err)
	}
	return revs
}

// agentLogCount counts the lines of the agent's log holding s.
func (w *world) agentLogCount(s string) int {
	b, _ := os.ReadFile(filepath.Join(w.stateDir, "agent.log"))
	return strings.Count(string(b), s)
}

// deploy writes a desired state for a fresh release of path.
func (w *world) deploy(id, path string) {
	w.putDesired(model.Desired{ReleaseID: id, RolloutID: "ro-" + id, StorePath: path, Release: w.release(id, path, w.admin)})
}

// deployAction deploys path with a release activated by action.
func (w *world) deployAction(id, path string, action model.Action) {
	w.putDesired(model.Desired{ReleaseID: id, RolloutID: "ro-" + id, StorePath: path, Release: w.releaseAction(id, path, w.admin, action)})
}

func (w *world) startAgent() {
	w.t.Helper()
	adminPub, _ := w.admin.PublicKey()
	if w.signers != nil {
		adminPub = strings.Join(w.signers, ",")
	}
	logf, err := os.OpenFile(filepath.Join(w.stateDir, "agent.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		w.t.Fatal(err)
	}
	cmd := exec.Command(agentBin, "--config", w.cfgFile, "--log-format", "json", "--log-level", "debug", "run",
		"--server", "nats://"+w.coord.ClientAddr(), "--state-dir", w.stateDir, "--release-signer", adminPub,
		"--hostname", host, "--profile", w.nix.Profile, "--current-system", w.nix.CurrentSystem,
		"--booted-system", w.nix.CurrentSystem, "--facts-interval", "1s", "--reconnect-within", "10s",
		"--apply-timeout", "1m", "--recheck", "3s")
	cmd.Env = w.nix.Environ()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		w.t.Fatal(err)
	}
	w.agent, w.agentLog = cmd, logf
}

// stopAgent signals the agent and waits for it to exit.
func (w *world) stopAgent(sig syscall.Signal) {
	if w.agent == nil {
		return
	}
	_ = w.agent.Process.Signal(sig)
	done := make(chan struct{})
	go func() { _ = w.agent.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = w.agent.Process.Kill()
		<-done
		w.t.Error("agent did not stop within 30s of", sig)
	}
	w.agentLog.Close()
	w.agent = nil
}

// waitEvent returns the first event (from now on) matching ok.
func (w *world) waitEvent(what string, ok func(model.Event) bool) model.Event {
	w.t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		select {
		case ev := <-w.events:
			w.seen = append(w.seen, ev)
			if ok(ev) {
				return ev
			}
		case <-deadline:
			w.t.Fatalf("no event %s within 60s", what)
		}
	}
}

func final(release string) func(model.Event) bool {
	return func(ev model.Event) bool { return ev.ReleaseID == release && ev.Result.Final() }
}

// drain reads every event published so far: it publishes a marker event
// and reads up to it.
func (w *world) drain() {
	w.t.Helper()
	b, _ := json.Marshal(model.Event{Device: w.device, State: model.StateIdle, Attempt: "marker"})
	if _, err := w.coord.JetStream().Publish(w.ctx, subjects.DeviceEvents(w.device), b); err != nil {
		w.t.Fatal(err)
	}
	w.waitEvent("marker", func(ev model.Event) bool { return ev.Attempt == "marker" })
}

func (w *world) finals(release string) []model.Event {
	var out []model.Event
	for _, ev := range w.seen {
		if final(release)(ev) {
			out = append(out, ev)
		}
	}
	return out
}

func (w *world) waitFacts(what string, ok func(model.Facts) bool) model.Facts {
	w.t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		select {
		case f := <-w.facts:
			if ok(f) {
				return f
			}
		case <-deadline:
			w.t.Fatalf("no facts %s within 60s", what)
		}
	}
}

func (w *world) wantCurrent(s nixtest.System) {
	w.t.Helper()
	if got := nixtest.Readlink(w.nix.CurrentSystem); got != s.Path {
		w.t.Fatalf("current system is %s, want %s (%s)", got, s.Path, s.Name)
	}
	if got := w.nix.ProfileTarget(); got != s.Path {
		w.t.Fatalf("profile points at %s, want %s (%s)", got, s.Path, s.Name)
	}
}

func (w *world) switchedTo(s nixtest.System) bool {
	return slices.ContainsFunc(w.nix.Switches(), func(l string) bool { return strings.HasSuffix(l, " "+s.Path) })
}

// A healthy generation is fetched, switched to and reported; an unhealthy
// one is rolled back with the failing check named; the same desired state
// again changes nothing.
func TestApplyThenRollBack(t *testing.T) {
	w := newWorld(t)
	key := &w.nix.TrustedKey
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	gen2 := w.build("gen2", nixtest.BuildOpts{}, key)
	gen3 := w.build("gen3", nixtest.BuildOpts{Unhealthy: true}, key)
	w.startAgent()

	w.deploy("gen2", gen2.Path)
	ev := w.waitEvent("final gen2", final("gen2"))
	if ev.Result != model.ResultSucceeded || ev.StorePath != gen2.Path || ev.RolloutID != "ro-gen2" || ev.Attempt == "" {
		t.Fatalf("gen2 final event: %+v", ev)
	}
	w.wantCurrent(gen2)
	gen2Attempt := ev.Attempt
	var states []model.State
	for _, e := range w.seen {
		if e.Attempt == ev.Attempt {
			states = append(states, e.State)
		}
	}
	want := []model.State{model.StateChecking, model.StateFetching, model.StateApplying, model.StateVerifying, model.StateReporting}
	if !slices.Equal(states, want) {
		t.Fatalf("states %v, want %v", states, want)
	}
	f := w.waitFacts("on gen2", func(f model.Facts) bool {
		return f.CurrentSystem == gen2.Path && f.LastApply != nil && f.LastApply.Result == model.ResultSucceeded
	})
	if f.NixOSVersion != "gen2" || f.Hostname == "" || f.Device != w.device {
		t.Fatalf("facts: %+v", f)
	}

	// The same desired state again (the identical value as a new KV
	// revision, as a reconnect or a rewrite delivers it) is a no-op. First
	// the agent must really get it: triggered, it reads the repeated
	// revision, before anything newer is written.
	const trigger = `"message":"desired state trigger"`
	replies := w.desiredReplies()
	triggers := w.agentLogCount(trigger)
	switchesBefore := w.nix.Switches()
	rev := w.repeatDesired()
	poll.Until(t, 30*time.Second, "the agent triggered by the repeated desired state", func() bool {
		return w.agentLogCount(trigger) > triggers
	})
	readRepeat := time.After(30 * time.Second)
	for got := uint64(0); got != rev; {
		select {
		case got = <-replies:
		case <-readRepeat:
			t.Fatalf("the agent did not read the repeated desired state (revision %d) within 30s", rev)
		}
	}

	w.deploy("gen3", gen3.Path)
	ev = w.waitEvent("final gen3", final("gen3"))
	if ev.Result != model.ResultRolledBack || ev.Check != "no-unhealthy-marker" {
		t.Fatalf("gen3 final event: %+v", ev)
	}
	w.wantCurrent(gen2)
	if !w.switchedTo(gen3) {
		t.Fatal("gen3 was never switched to")
	}
	// The agent handles one desired state at a time: whatever the repeat
	// did happened before gen3's turn. Nothing was switched for it...
	switches := w.nix.Switches()
	firstGen3 := slices.IndexFunc(switches, func(l string) bool { return strings.HasSuffix(l, " "+gen3.Path) })
	if !slices.Equal(switches[:firstGen3], switchesBefore) {
		t.Fatalf("switches before gen3's %q, want only those before the repeat %q", switches[:firstGen3], switchesBefore)
	}
	// ...and no apply was started or reported for it: gen2's one attempt
	// is all there is.
	w.drain()
	for _, e := range w.seen {
		if e.ReleaseID == "gen2" && e.Attempt != gen2Attempt {
			t.Fatalf("the repeated desired state started apply %s: %+v", e.Attempt, e)
		}
	}
	if n := len(w.finals("gen2")); n != 1 {
		t.Fatalf("%d final events for gen2, want 1", n)
	}
}

// A closure signed by a key the host does not trust is refused by Nix:
// nothing is switched.
func TestUntrustedClosure(t *testing.T) {
	w := newWorld(t)
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	bad, err := w.nix.NewKey(w.ctx, "untrusted")
	if err != nil {
		t.Fatal(err)
	}
	evil := w.build("evil", nixtest.BuildOpts{}, &bad)
	w.startAgent()
	w.deploy("evil", evil.Path)
	ev := w.waitEvent("final evil", final("evil"))
	if ev.Result != model.ResultFailed || !strings.Contains(ev.Error+ev.Log, "lacks a valid signature") {
		t.Fatalf("final event: %+v", ev)
	}
	w.wantCurrent(gen1)
	if w.switchedTo(evil) || w.nix.Valid(w.ctx, evil.Path) {
		t.Fatal("the untrusted closure was switched to or stored")
	}
}

// Manifests with an unknown signer, a tampered payload or a path that is
// not the signed one are refused before anything is fetched.
func TestBadManifestsRefusedBeforeFetch(t *testing.T) {
	w := newWorld(t)
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	gen2 := w.build("gen2", nixtest.BuildOpts{}, &w.nix.TrustedKey)
	other := w.build("other", nixtest.BuildOpts{}, &w.nix.TrustedKey)
	stranger, _ := nkeys.CreateUser()
	w.startAgent()

	tampered := w.release("tampered", gen1.Path, w.admin)
	tampered.Payload = json.RawMessage(strings.Replace(string(tampered.Payload), gen1.Path, gen2.Path, 1))

	cases := []struct {
		name, wantErr string
		d             model.Desired
	}{
		{"unknown-signer", "not trusted", model.Desired{ReleaseID: "unknown-signer", StorePath: gen2.Path, Release: w.release("unknown-signer", gen2.Path, stranger)}},
		{"tampered", "signature does not match", model.Desired{ReleaseID: "tampered", StorePath: gen2.Path, Release: tampered}},
		{"mismatch", "is not the one release", model.Desired{ReleaseID: "mismatch", StorePath: gen2.Path, Release: w.release("mismatch", other.Path, w.admin)}},
		{"unsigned", "not signed", model.Desired{ReleaseID: "unsigned", StorePath: gen2.Path}},
	}
	for _, c := range cases {
		c.d.RolloutID = "ro-" + c.name
		w.putDesired(c.d)
		ev := w.waitEvent("final "+c.name, final(c.name))
		if ev.Result != model.ResultFailed || !strings.Contains(ev.Error, c.wantErr) {
			t.Fatalf("%s: final event %+v, want failed with %q", c.name, ev, c.wantErr)
		}
	}
	// Not JSON at all: reported, not a crash.
	kv, _ := w.coord.JetStream().KeyValue(w.ctx, subjects.BucketDesired)
	if _, err := kv.Put(w.ctx, w.device, []byte("{not json")); err != nil {
		t.Fatal(err)
	}
	w.waitEvent("failed garbage", func(ev model.Event) bool {
		return ev.Result == model.ResultFailed && strings.Contains(ev.Error, "not valid JSON")
	})
	for _, s := range []nixtest.System{gen2, other} {
		if w.nix.Valid(w.ctx, s.Path) {
			t.Fatalf("%s was fetched for a refused manifest", s.Name)
		}
	}
	w.wantCurrent(gen1)
	if len(w.nix.Switches()) != 0 {
		t.Fatalf("switches happened: %q", w.nix.Switches())
	}
	// A deleted desired state leaves the device alone.
	if err := kv.Delete(w.ctx, w.device); err != nil {
		t.Fatal(err)
	}
	w.drain()
	w.wantCurrent(gen1)
}

// killMidSwitch deploys gen (a Gated system) as release "gen2" and kills
// the agent with SIGKILL while its switch waits on the gate; it returns
// the applying event of that attempt.
func (w *world) killMidSwitch(gen nixtest.System) model.Event {
	w.t.Helper()
	w.startAgent()
	w.deploy("gen2", gen.Path)
	applying := w.waitEvent("applying gen2", func(ev model.Event) bool {
		return ev.ReleaseID == "gen2" && ev.State == model.StateApplying
	})
	poll.Until(w.t, 30*time.Second, "switch blocked on its gate", func() bool {
		return slices.Contains(w.nix.Switches(), "begin switch "+gen.Path)
	})
	w.stopAgent(syscall.SIGKILL)
	return applying
}

// An agent killed with SIGKILL while switching resumes after restart,
// finishes verification and reports the attempt exactly once.
func TestKilledDuringApplyResumes(t *testing.T) {
	w := newWorld(t)
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	gen2 := w.build("gen2", nixtest.BuildOpts{Gated: true}, &w.nix.TrustedKey)
	applying := w.killMidSwitch(gen2)
	// The orphaned switch completes once the gate opens.
	ctx, cancel := context.WithTimeout(w.ctx, 30*time.Second)
	defer cancel()
	if err := w.nix.OpenGate(ctx, gen2); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 30*time.Second, "orphaned switch finished", func() bool { return nixtest.Readlink(w.nix.CurrentSystem) == gen2.Path })

	w.startAgent()
	ev := w.waitEvent("final gen2", final("gen2"))
	if ev.Result != model.ResultSucceeded || ev.Attempt != applying.Attempt {
		t.Fatalf("final event %+v, want succeeded for attempt %s", ev, applying.Attempt)
	}
	w.wantCurrent(gen2)
	// Restart again: nothing more is reported for that attempt.
	w.stopAgent(syscall.SIGTERM)
	w.startAgent()
	w.waitFacts("after second restart", func(f model.Facts) bool { return f.CurrentSystem == gen2.Path })
	w.drain()
	if n := len(w.finals("gen2")); n != 1 {
		t.Fatalf("%d final events for gen2, want exactly 1", n)
	}
}

// An agent killed mid-switch whose switch never completed rolls back to
// the previous generation after restart.
func TestKilledSwitchIncompleteRollsBack(t *testing.T) {
	w := newWorld(t)
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	gen2 := w.build("gen2", nixtest.BuildOpts{Gated: true}, &w.nix.TrustedKey)
	applying := w.killMidSwitch(gen2)
	w.startAgent()
	ev := w.waitEvent("final gen2", final("gen2"))
	if ev.Result != model.ResultRolledBack || ev.Attempt != applying.Attempt {
		t.Fatalf("final event %+v, want rolled_back for attempt %s", ev, applying.Attempt)
	}
	w.wantCurrent(gen1)
	// Let the orphaned switch go so it does not outlive the test.
	ctx, cancel := context.WithTimeout(w.ctx, 30*time.Second)
	defer cancel()
	_ = w.nix.OpenGate(ctx, gen2)
}

// Desired states arriving during an apply wait for it, and only the
// newest of them is applied next.
func TestNewerDesiredDuringApplyCoalesced(t *testing.T) {
	w := newWorld(t)
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	gen2 := w.build("gen2", nixtest.BuildOpts{Gated: true}, &w.nix.TrustedKey)
	gen3 := w.build("gen3", nixtest.BuildOpts{}, &w.nix.TrustedKey)
	gen4 := w.build("gen4", nixtest.BuildOpts{}, &w.nix.TrustedKey)
	w.startAgent()
	w.deploy("gen2", gen2.Path)
	poll.Until(t, 30*time.Second, "switch blocked on its gate", func() bool {
		return slices.Contains(w.nix.Switches(), "begin switch "+gen2.Path)
	})
	w.deploy("gen3", gen3.Path)
	w.deploy("gen4", gen4.Path)
	// Two triggers after the switch began (gen3, gen4): the agent knows
	// its state changed again while it applies gen2.
	poll.Until(t, 30*time.Second, "agent got the gen4 trigger", func() bool {
		b, _ := os.ReadFile(filepath.Join(w.stateDir, "agent.log"))
		_, after, ok := strings.Cut(string(b), gen2.Path+"/bin/switch-to-configuration")
		return ok && strings.Count(after, `"message":"desired state trigger"`) >= 2
	})
	ctx, cancel := context.WithTimeout(w.ctx, 30*time.Second)
	defer cancel()
	if err := w.nix.OpenGate(ctx, gen2); err != nil {
		t.Fatal(err)
	}
	if ev := w.waitEvent("final gen2", final("gen2")); ev.Result != model.ResultSucceeded {
		t.Fatalf("gen2: %+v", ev)
	}
	if ev := w.waitEvent("final gen4", final("gen4")); ev.Result != model.ResultSucceeded {
		t.Fatalf("gen4: %+v", ev)
	}
	w.wantCurrent(gen4)
	w.drain()
	if w.switchedTo(gen3) || w.nix.Valid(w.ctx, gen3.Path) || len(w.finals("gen3")) != 0 {
		t.Fatal("the superseded gen3 was fetched, switched to or reported")
	}
}

// Desired state changed twice while the agent was away: on return it
// applies only the latest.
func TestOfflineAppliesLatestOnly(t *testing.T) {
	w := newWorld(t)
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	gen2 := w.build("gen2", nixtest.BuildOpts{}, &w.nix.TrustedKey)
	gen3 := w.build("gen3", nixtest.BuildOpts{}, &w.nix.TrustedKey)
	w.startAgent()
	w.waitFacts("first report", func(f model.Facts) bool { return f.CurrentSystem == gen1.Path })
	w.stopAgent(syscall.SIGTERM)

	w.deploy("gen2", gen2.Path)
	w.deploy("gen3", gen3.Path)
	w.startAgent()
	ev := w.waitEvent("final gen3", final("gen3"))
	if ev.Result != model.ResultSucceeded {
		t.Fatalf("final event %+v", ev)
	}
	w.wantCurrent(gen3)
	w.drain()
	if w.switchedTo(gen2) || w.nix.Valid(w.ctx, gen2.Path) || len(w.finals("gen2")) != 0 {
		t.Fatal("the intermediate gen2 was fetched, switched to or reported")
	}
}

// `fleet-agent facts` prints the facts the agent reports, as JSON.
func TestFactsCommand(t *testing.T) {
	w := newWorld(t)
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	ctx, cancel := context.WithTimeout(w.ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, agentBin, "facts", "--state-dir", w.stateDir,
		"--current-system", w.nix.CurrentSystem, "--booted-system", w.nix.CurrentSystem).Output()
	if err != nil {
		t.Fatal(err)
	}
	var f model.Facts
	if err := json.Unmarshal(out, &f); err != nil {
		t.Fatalf("facts output is not JSON: %v\n%s", err, out)
	}
	if f.Device != w.device || f.CurrentSystem != gen1.Path || f.NixOSVersion != "gen1" || f.RebootNeeded || f.Hostname == "" {
		t.Fatalf("facts: %+v", f)
	}
	if slices.Contains(f.Unknown, "current_system") || slices.Contains(f.Unknown, "reboot_needed") {
		t.Fatalf("unknown: %v", f.Unknown)
	}
}

// wantSystems checks the running system and the profile separately.
func (w *world) wantSystems(running, profile nixtest.System) {
	w.t.Helper()
	if got := nixtest.Readlink(w.nix.CurrentSystem); got != running.Path {
		w.t.Fatalf("current system is %s, want %s (%s)", got, running.Path, running.Name)
	}
	if got := w.nix.ProfileTarget(); got != profile.Path {
		w.t.Fatalf("profile points at %s, want %s (%s)", got, profile.Path, profile.Name)
	}
}

func (w *world) lastSwitch() string {
	l := w.nix.Switches()
	if len(l) == 0 {
		return ""
	}
	return l[len(l)-1]
}

// Action boot sets the profile and the boot default only: the running
// system is not health-checked (it did not change), the success says a
// reboot activates it, facts say a reboot is needed, and a failed boot
// switch returns the profile to the previous generation and runs that
// generation's switch-to-configuration boot (not the running system's).
func TestBootAction(t *testing.T) {
	w := newWorld(t)
	key := &w.nix.TrustedKey
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	gen2 := w.build("gen2", nixtest.BuildOpts{Unhealthy: true}, key)
	broken := w.build("broken", nixtest.BuildOpts{FailSwitch: true}, key)
	w.startAgent()

	w.deployAction("gen2", gen2.Path, model.ActionBoot)
	ev := w.waitEvent("final gen2", final("gen2"))
	if ev.Result != model.ResultSucceeded || ev.Log != agent.BootNote || ev.Check != "" {
		t.Fatalf("gen2 (boot) final event: %+v", ev)
	}
	w.wantSystems(gen1, gen2)
	if got := w.lastSwitch(); got != "boot "+gen2.Path {
		t.Fatalf("last switch %q, want boot of gen2", got)
	}
	var states []model.State
	for _, e := range w.seen {
		if e.Attempt == ev.Attempt {
			states = append(states, e.State)
		}
	}
	want := []model.State{model.StateChecking, model.StateFetching, model.StateApplying, model.StateVerifying, model.StateReporting}
	if !slices.Equal(states, want) {
		t.Fatalf("states %v, want %v", states, want)
	}
	w.waitFacts("reboot needed", func(f model.Facts) bool {
		return f.CurrentSystem == gen1.Path && f.RebootNeeded && f.LastApply != nil && f.LastApply.ReleaseID == "gen2"
	})

	w.deployAction("broken", broken.Path, model.ActionBoot)
	ev = w.waitEvent("final broken", final("broken"))
	if ev.Result != model.ResultRolledBack || !strings.Contains(ev.Error, "switch") || !strings.Contains(ev.Log, "cannot boot") {
		t.Fatalf("broken (boot) final event: %+v", ev)
	}
	w.wantSystems(gen1, gen2)
	if got := w.lastSwitch(); got != "boot "+gen2.Path {
		t.Fatalf("last switch %q, want gen2's switch-to-configuration boot (the profile's previous generation)", got)
	}
}

// Action test activates without touching the profile; its rollback
// activates the previous running system with test.
func TestTestAction(t *testing.T) {
	w := newWorld(t)
	key := &w.nix.TrustedKey
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	gen2 := w.build("gen2", nixtest.BuildOpts{}, key)
	gen3 := w.build("gen3", nixtest.BuildOpts{Unhealthy: true}, key)
	w.startAgent()

	w.deployAction("gen2", gen2.Path, model.ActionTest)
	if ev := w.waitEvent("final gen2", final("gen2")); ev.Result != model.ResultSucceeded || ev.Log != "" {
		t.Fatalf("gen2 (test) final event: %+v", ev)
	}
	w.wantSystems(gen2, gen1)
	if got := w.lastSwitch(); got != "test "+gen2.Path {
		t.Fatalf("last switch %q", got)
	}

	w.deployAction("gen3", gen3.Path, model.ActionTest)
	ev := w.waitEvent("final gen3", final("gen3"))
	if ev.Result != model.ResultRolledBack || ev.Check != "no-unhealthy-marker" {
		t.Fatalf("gen3 (test) final event: %+v", ev)
	}
	w.wantSystems(gen2, gen1)
	if got := w.lastSwitch(); got != "test "+gen2.Path {
		t.Fatalf("last switch %q, want gen2's switch-to-configuration test", got)
	}
	if !w.switchedTo(gen3) {
		t.Fatal("gen3 was never activated")
	}
}

// A check whose command leaves a grandchild holding its output for 25 s,
// with timeout 1s and health deadline 3s, rolls back within seconds: the
// deadline ends the whole process group.
func TestSlowCheckDeadlineHolds(t *testing.T) {
	w := newWorld(t)
	cfg := `{"health-deadline": "3s", "health-checks": [{"name": "slow", "type": "command", "timeout": "1s",
		"command": ["/bin/sh", "-c", "sleep 25; exit 1"]}]}`
	if err := os.WriteFile(w.cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	gen2 := w.build("gen2", nixtest.BuildOpts{}, &w.nix.TrustedKey)
	w.startAgent()
	w.deploy("gen2", gen2.Path)
	verifying := w.waitEvent("verifying gen2", func(ev model.Event) bool {
		return ev.ReleaseID == "gen2" && ev.State == model.StateVerifying
	})
	ev := w.waitEvent("final gen2", final("gen2"))
	if ev.Result != model.ResultRolledBack || ev.Check != "slow" {
		t.Fatalf("final event: %+v", ev)
	}
	if d := ev.Time.Sub(verifying.Time); d > 10*time.Second {
		t.Fatalf("verifying to rolled back took %s with a 3s health deadline", d)
	}
	w.wantCurrent(gen1)
}

// fleet-agent run refuses a malformed --release-signer, warns about a
// missing one before enrolling, and names a missing token file.
func TestRunFlagsChecked(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	state := t.TempDir()
	current := filepath.Join(t.TempDir(), "current-system")
	if err := os.Symlink(t.TempDir(), current); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, agentBin, append([]string{"--log-format", "json", "run", "--state-dir", state,
			"--server", "nats://127.0.0.1:1", "--current-system", current}, args...)...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := run("--release-signer", "not-a-key")
	if err == nil || !strings.Contains(out, "--release-signer") || !strings.Contains(out, "not-a-key") {
		t.Fatalf("bad signer: err %v, output %s", err, out)
	}
	missing := filepath.Join(state, "no-such-token")
	out, err = run("--enroll-token-file", missing)
	if err == nil || !strings.Contains(out, missing) {
		t.Fatalf("missing token file: err %v, output %s", err, out)
	}
	warn := strings.Index(out, "every release will be refused")
	if warn < 0 || warn > strings.Index(out, missing) {
		t.Fatalf("no warning about the missing --release-signer before the enrollment error:\n%s", out)
	}
}

// A desired state refused for its signer is checked again after the agent
// restarts (with the signer now trusted), not remembered as handled.
func TestRefusedSignerRetriedAfterRestart(t *testing.T) {
	w := newWorld(t)
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	gen2 := w.build("gen2", nixtest.BuildOpts{}, &w.nix.TrustedKey)
	second, _ := nkeys.CreateUser()
	w.startAgent()
	w.putDesired(model.Desired{ReleaseID: "gen2", RolloutID: "ro-gen2", StorePath: gen2.Path, Release: w.release("gen2", gen2.Path, second)})
	if ev := w.waitEvent("refused gen2", final("gen2")); ev.Result != model.ResultFailed || !strings.Contains(ev.Error, "not trusted") {
		t.Fatalf("final event: %+v", ev)
	}
	w.stopAgent(syscall.SIGTERM)
	adminPub, _ := w.admin.PublicKey()
	secondPub, _ := second.PublicKey()
	w.signers = []string{adminPub, secondPub}
	w.startAgent()
	if ev := w.waitEvent("gen2 applied after restart", final("gen2")); ev.Result != model.ResultSucceeded {
		t.Fatalf("final event after restart: %+v", ev)
	}
	w.wantCurrent(gen2)
}

// Rollback protection: an old desired state, with the admin's old signed
// deploy, written again (by a compromised coordinator, or replayed from a
// capture) is refused; the device stays on what it runs.
func TestOldDesiredStateRefused(t *testing.T) {
	w := newWorld(t)
	key := &w.nix.TrustedKey
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	gen2 := w.build("gen2", nixtest.BuildOpts{}, key)
	gen3 := w.build("gen3", nixtest.BuildOpts{}, key)
	w.startAgent()

	w.deploy("gen2", gen2.Path)
	if ev := w.waitEvent("final gen2", final("gen2")); ev.Result != model.ResultSucceeded {
		t.Fatalf("gen2: %+v", ev)
	}
	kv, err := w.coord.JetStream().KeyValue(w.ctx, subjects.BucketDesired)
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(w.ctx, w.device)
	if err != nil {
		t.Fatal(err)
	}
	var old model.Desired
	if err := json.Unmarshal(e.Value(), &old); err != nil {
		t.Fatal(err)
	}
	w.deploy("gen3", gen3.Path)
	if ev := w.waitEvent("final gen3", final("gen3")); ev.Result != model.ResultSucceeded {
		t.Fatalf("gen3: %+v", ev)
	}
	// gen2's desired state again, its signed deploy and all, as a new
	// write: refused before anything is fetched or switched.
	old.RolloutID = "ro-replayed"
	w.putDesired(old)
	ev := w.waitEvent("replayed gen2 refused", func(ev model.Event) bool { return ev.RolloutID == "ro-replayed" && ev.Result.Final() })
	if ev.Result != model.ResultFailed || !strings.Contains(ev.Error, "older than the last") {
		t.Fatalf("replayed old desired state: %+v", ev)
	}
	w.wantCurrent(gen3)
	if n := strings.Count(strings.Join(w.nix.Switches(), "\n"), gen2.Path); n != 1 {
		t.Fatalf("gen2 switched to %d times, want once", n)
	}
}

// A cache that is down for a few seconds does not fail the device: the
// fetch is retried with backoff within --apply-timeout, and the final event
// says how many attempts it took.
func TestFetchRetriedWhileCacheDown(t *testing.T) {
	w := newWorld(t)
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	gen2 := w.build("gen2", nixtest.BuildOpts{}, &w.nix.TrustedKey)
	w.startAgent()
	w.nix.SetCacheDown(true)
	w.deploy("gen2", gen2.Path)
	w.waitEvent("fetching gen2", func(ev model.Event) bool { return ev.ReleaseID == "gen2" && ev.State == model.StateFetching })
	// At least one attempt has failed against the down cache before it
	// comes back.
	poll.Until(t, 30*time.Second, "a failed fetch attempt", func() bool {
		b, _ := os.ReadFile(filepath.Join(w.stateDir, "agent.log"))
		return strings.Contains(string(b), "fetch failed for a passing reason")
	})
	w.nix.SetCacheDown(false)
	ev := w.waitEvent("final gen2", final("gen2"))
	if ev.Result != model.ResultSucceeded || !strings.Contains(ev.Log, "fetched after") {
		t.Fatalf("gen2 after the cache came back: %+v", ev)
	}
	w.wantCurrent(gen2)
}

// A change notification lost while connected does not stall the device:
// it re-reads its desired state on a jittered timer (--recheck).
func TestLostNotificationRecovered(t *testing.T) {
	w := newWorld(t)
	gen1 := w.build("gen1", nixtest.BuildOpts{}, nil)
	w.install(gen1)
	gen2 := w.build("gen2", nixtest.BuildOpts{}, &w.nix.TrustedKey)
	w.startAgent()
	w.waitFacts("first report", func(model.Facts) bool { return true })
	// The coordinator sends triggers only to active devices: with the
	// record briefly not active, the write's trigger is lost.
	devKV, err := w.coord.JetStream().KeyValue(w.ctx, subjects.BucketDevices)
	if err != nil {
		t.Fatal(err)
	}
	setStatus := func(st model.DeviceStatus) {
		rec, _ := json.Marshal(model.Device{ID: w.device, Name: host, Site: subjects.DefaultSite, Status: st, EnrolledAt: time.Now().UTC()})
		if _, err := devKV.Put(w.ctx, w.device, rec); err != nil {
			t.Fatal(err)
		}
	}
	setStatus(model.DevicePending)
	poll.Until(t, 5*time.Second, "the coordinator's index to see the device inactive", func() bool {
		for _, d := range w.coord.Status("").Devices {
			if d.ID == w.device {
				return d.Status == model.DevicePending
			}
		}
		return false
	})
	dropped := func() float64 {
		return metricValue(t, w.coord, "fleet_requests_dropped_total", "handler", "notify")
	}
	before := dropped()
	w.deploy("gen2", gen2.Path)
	poll.Until(t, 5*time.Second, "the trigger dropped", func() bool { return dropped() > before })
	setStatus(model.DeviceActive)
	ev := w.waitEvent("final gen2 without a trigger", final("gen2"))
	if ev.Result != model.ResultSucceeded {
		t.Fatalf("gen2: %+v", ev)
	}
	b, _ := os.ReadFile(filepath.Join(w.stateDir, "agent.log"))
	if strings.Contains(string(b), `"message":"desired state trigger"`) {
		t.Fatal("the agent got a trigger after all: the test did not lose it")
	}
}

// metricValue is the value of the series of name with label=value in the
// coordinator's registry (0 when none).
func metricValue(t *testing.T, c *broker.Coordinator, name, label, value string) float64 {
	t.Helper()
	v, _, err := promvalue.Get(c.Metrics(), name, map[string]string{label: value})
	if err != nil {
		t.Fatal(err)
	}
	return v
}
