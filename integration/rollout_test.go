package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	mathrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/agent"
	"fleet/broker"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// A fleet of real agents (the agent package's reconcile loop, enrolled with a
// real token) against the real fleet-coordinator binary, driven with the
// real fleet-admin binary. The agents activate through memActivator: Nix
// activation itself is tested with real Nix in agent_test.go, and twenty
// system closures here would only slow the test down.

// memActivator is a device's system profile in memory.
type memActivator struct {
	mu       sync.Mutex
	current  string
	gens     []string
	switches map[string]int
	// gate, when set, holds Switch until it is closed (to kill the
	// coordinator mid-apply).
	gate chan struct{}
	// switching is closed when a gated Switch starts waiting.
	switching chan struct{}
}

func newMemActivator(initial string) *memActivator {
	return &memActivator{current: initial, gens: []string{initial}, switches: map[string]int{}}
}

func (m *memActivator) Current(context.Context) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.current, nil
}

func (m *memActivator) Fetch(context.Context, string, string) error { return nil }

func (m *memActivator) Snapshot(context.Context) (agent.Generation, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return agent.Generation{Number: len(m.gens), System: m.current}, nil
}

func (m *memActivator) Switch(ctx context.Context, path string, _ model.Action) error {
	m.mu.Lock()
	gate, switching := m.gate, m.switching
	m.mu.Unlock()
	if gate != nil {
		close(switching)
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.gens = append(m.gens, path)
	m.current = path
	m.switches[path]++
	return nil
}

func (m *memActivator) Rollback(_ context.Context, to agent.Generation, _ model.Action) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.current = to.System
	m.gens = append(m.gens, to.System)
	return nil
}

func (m *memActivator) Active(_ context.Context, path string, _ model.Action) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.current == path, nil
}

// holdSwitch makes the next Switch wait until gate is closed; switching is
// closed when it starts waiting.
func (m *memActivator) holdSwitch() (gate chan struct{}, switching <-chan struct{}) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.gate, m.switching = make(chan struct{}), make(chan struct{})
	return m.gate, m.switching
}

func (m *memActivator) state() (string, int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.current, len(m.gens)
}

func (m *memActivator) switchCount(path string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.switches[path]
}

// appCheck is the device's health check: it fails while the running system
// is the one marked bad.
type appCheck struct {
	act *memActivator
	bad *atomic.Pointer[string]
}

func (appCheck) Name() string { return "app-health" }

func (c appCheck) Check(context.Context) error {
	cur, _ := c.act.state()
	if b := c.bad.Load(); b != nil && *b == cur {
		return errors.New("app answers 500")
	}
	return nil
}

type fleetDevice struct {
	name string
	id   string
	act  *memActivator
	bad  atomic.Pointer[string]
}

// fleetWorld is a coordinator process, its owner's creds and devices.
type fleetWorld struct {
	t       *testing.T
	ctx     context.Context
	dataDir string
	listen  string
	httpAdr string
	creds   string
	coord   *exec.Cmd
	coordWG sync.WaitGroup
	// extra are further flags of fleet-coordinator run.
	extra   []string
	devices []*fleetDevice
	signer  string
}

// handedOut are the ports freeAddr gave this test binary: a port is free
// again the moment freeAddr closes its listener, and a second call (the
// next flag of the same node) must not get it too.
var handedOut = struct {
	sync.Mutex
	ports map[int]bool
}{ports: map[int]bool{}}

func freeAddr(t *testing.T) string {
	t.Helper()
	// Below Linux's ephemeral range (32768-60999): a port the kernel hands
	// out for port 0 or for an outgoing connection (other packages' tests
	// run at the same time, with thousands of them) could take this one
	// between here and the process that listens on it.
	handedOut.Lock()
	defer handedOut.Unlock()
	for range 100 {
		port := 10000 + mathrand.IntN(22000)
		if handedOut.ports[port] {
			continue
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		ln, err := net.Listen("tcp", addr)
		if err == nil {
			ln.Close()
			handedOut.ports[port] = true
			return addr
		}
	}
	t.Fatal("no free port below the ephemeral range")
	return ""
}

func newFleetWorld(t *testing.T) *fleetWorld {
	t.Helper()
	return newFleetWorldWith(t)
}

func newFleetWorldWith(t *testing.T, extra ...string) *fleetWorld {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	w := &fleetWorld{t: t, ctx: ctx, dataDir: t.TempDir(), listen: freeAddr(t), httpAdr: freeAddr(t), extra: extra}
	w.creds = filepath.Join(w.dataDir, accounts.AdminCredsFile)
	w.startCoordinator()
	cr, err := accounts.ReadCreds(w.creds)
	if err != nil {
		t.Fatal(err)
	}
	w.signer = cr.PublicKey()
	return w
}

// startCoordinator runs the fleet-coordinator binary and waits for /readyz.
func (w *fleetWorld) startCoordinator() {
	w.t.Helper()
	logf, err := os.OpenFile(filepath.Join(w.dataDir, "..", "coordinator.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		w.t.Fatal(err)
	}
	cmd := exec.Command(coordinatorBin, append([]string{"--log-format", "json", "run", "--data-dir", w.dataDir,
		"--listen", w.listen, "--http", w.httpAdr, "--server-name", "hub"}, w.extra...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		w.t.Fatal(err)
	}
	w.coord = cmd
	w.coordWG.Add(1)
	go func() { defer w.coordWG.Done(); _ = cmd.Wait(); logf.Close() }()
	w.t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		w.coordWG.Wait()
		if w.t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			w.t.Logf("coordinator log (tail):\n%s", tail(string(b), 4000))
		}
	})
	poll.Until(w.t, 30*time.Second, "coordinator ready", func() bool {
		resp, err := http.Get("http://" + w.httpAdr + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// killCoordinator kills the coordinator with SIGKILL: no clean shutdown.
func (w *fleetWorld) killCoordinator() {
	w.t.Helper()
	if err := w.coord.Process.Kill(); err != nil {
		w.t.Fatal(err)
	}
	w.coordWG.Wait()
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// admin runs the fleet-admin binary as the owner.
func (w *fleetWorld) admin(args ...string) (string, string, error) {
	cmd := exec.CommandContext(w.ctx, adminBin, append([]string{"--server", "nats://" + w.listen, "--creds", w.creds}, args...)...)
	// No terminal to confirm on: the tests mean their revokes and aborts.
	cmd.Env = append(os.Environ(), "FLEET_YES=1")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

func (w *fleetWorld) mustAdmin(args ...string) string {
	w.t.Helper()
	out, errs, err := w.admin(args...)
	if err != nil {
		w.t.Fatalf("fleet-admin %s: %v\n%s", strings.Join(args, " "), err, errs)
	}
	return out
}

// addDevices enrols n agents with a real token and runs them.
func (w *fleetWorld) addDevices(n int, group, initial string) {
	w.t.Helper()
	token := strings.TrimSpace(w.mustAdmin("token", "create", "--group", group, "--uses", fmt.Sprint(n), "--ttl", "1h"))
	for i := range n {
		d, _ := w.startDevice(fmt.Sprintf("dev%02d", i), token, "nats://"+w.listen, initial)
		w.devices = append(w.devices, d)
	}
}

// startDevice enrols a device with token through url and runs the real
// agent loop for it (the instant in-memory activator stands in for Nix).
func (w *fleetWorld) startDevice(name, token, url, initial string) (*fleetDevice, *accounts.Creds) {
	w.t.Helper()
	d := &fleetDevice{name: name, act: newMemActivator(initial)}
	dir := filepath.Join(w.t.TempDir(), d.name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		w.t.Fatal(err)
	}
	var cr *accounts.Creds
	var err error
	// Through a leaf node the coordinator's interest may take a moment.
	poll.Until(w.t, 30*time.Second, "enrolment of "+name, func() bool {
		ctx, cancel := context.WithTimeout(w.ctx, 5*time.Second)
		defer cancel()
		cr, err = agent.LoadOrEnroll(ctx, agent.EnrollOptions{Servers: []string{url}, StateDir: dir, Token: token, Hostname: d.name, Log: zerolog.Nop()})
		return err == nil
	})
	d.id = cr.PublicKey()
	ag, err := agent.New(agent.Options{
		DeviceID: d.id, Key: cr.Key, Site: cr.Site(), Hostname: d.name, StateDir: dir,
		ReleaseSigners:  []string{w.signer},
		Activator:       d.act,
		Checks:          []agent.Retrying{{HealthChecker: appCheck{act: d.act, bad: &d.bad}, Timeout: time.Second}},
		HealthDeadline:  10 * time.Second,
		ReconnectWithin: 30 * time.Second,
		ApplyTimeout:    time.Minute,
		FactsInterval:   time.Hour,
		Facts: []agent.FactSource{agent.FactSourceFunc{N: "system", F: func(ctx context.Context, f *model.Facts) error {
			f.CurrentSystem, _ = d.act.Current(ctx)
			return nil
		}}},
		Log: zerolog.Nop(),
	})
	if err != nil {
		w.t.Fatal(err)
	}
	nc, err := agent.Connect(w.ctx, cr, agent.ConnOptions{Servers: []string{url}, Name: d.name, Log: zerolog.Nop(), OnConnect: ag.OnConnect})
	if err != nil {
		w.t.Fatal(err)
	}
	actx, stop := context.WithCancel(w.ctx)
	done := make(chan struct{})
	go func() { defer close(done); _ = ag.Run(actx, nc) }()
	w.t.Cleanup(func() { stop(); <-done; nc.Close() })
	return d, cr
}

// release records a release whose default closure is path.
func (w *fleetWorld) release(name, path string) {
	w.t.Helper()
	w.mustAdmin("release", "create", "--name", name, "--default", path)
}

func fakePath(name string) string {
	return "/nix/store/" + strings.Repeat("0", 31) + "1-" + name
}

// deployWait runs deploy --wait --json and returns the last JSON line's
// rollout and the exit error.
func (w *fleetWorld) deployWait(args ...string) (model.RolloutView, string, error) {
	w.t.Helper()
	out, errs, err := w.admin(append([]string{"--json", "deploy", "--wait"}, args...)...)
	return lastRollout(w.t, out), errs, err
}

func lastRollout(t *testing.T, out string) model.RolloutView {
	t.Helper()
	var last model.RolloutView
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	n := 0
	for sc.Scan() {
		if err := json.Unmarshal(sc.Bytes(), &last); err != nil {
			t.Fatalf("--json line is not a rollout: %v: %s", err, sc.Text())
		}
		n++
	}
	if n == 0 {
		t.Fatalf("no JSON lines in: %q", out)
	}
	return last
}

func (w *fleetWorld) onSystem(path string, devs ...*fleetDevice) bool {
	for _, d := range devs {
		if cur, _ := d.act.state(); cur != path {
			return false
		}
	}
	return true
}

// Canary 1 → 50% → 100% over twenty agents: every device ends on the
// release, each switched once, and the audit trail has the deploys.
func TestRolloutCanaryToAll(t *testing.T) {
	w := newFleetWorld(t)
	gen1, gen2 := fakePath("gen1"), fakePath("gen2")
	w.addDevices(20, "developers", gen1)
	w.release("rel-2", gen2)

	ro, errs, err := w.deployWait("--release", "rel-2", "--group", "developers", "--strategy", "canary", "--batches", "1,50%,100%")
	if err != nil {
		t.Fatalf("deploy --wait: %v\n%s", err, errs)
	}
	if ro.State != model.RolloutSucceeded || fmt.Sprint(ro.BatchSizes) != "[1 9 10]" || ro.Counts[model.DeviceSucceeded] != 20 {
		t.Fatalf("rollout %+v", ro.Rollout)
	}
	for _, d := range w.devices {
		if cur, _ := d.act.state(); cur != gen2 || d.act.switchCount(gen2) != 1 {
			t.Fatalf("%s: running %s, switched to gen2 %d times", d.name, cur, d.act.switchCount(gen2))
		}
	}
	// status --json shows what the agents reported: all online, on gen2.
	var rep model.StatusReport
	poll.Until(w.t, 30*time.Second, "status: every device reports gen2", func() bool {
		if err := json.Unmarshal([]byte(w.mustAdmin("--json", "status", "--group", "developers")), &rep); err != nil {
			t.Fatal(err)
		}
		return rep.Summary.Total == 20 && rep.Summary.UpToDate == 20
	})
	for _, r := range rep.Devices {
		if !r.Online || r.CurrentSystem != gen2 || r.DesiredSystem != gen2 || r.LastResult != model.ResultSucceeded || r.Rollout != ro.ID {
			t.Fatalf("status row %+v", r)
		}
	}
	if rep.Summary.Online != 20 || rep.Summary.Failing != 0 || rep.Summary.Pending != 0 {
		t.Fatalf("status summary %+v", rep.Summary)
	}
	if out := w.mustAdmin("status", "--group", "developers"); !strings.Contains(out, "20 devices, 20 online, 20 up to date, 0 failing") {
		t.Fatalf("status table:\n%s", out)
	}
	var facts []model.Facts
	if err := json.Unmarshal([]byte(w.mustAdmin("--json", "facts", "dev05", "--since", "1h")), &facts); err != nil || len(facts) == 0 || facts[len(facts)-1].CurrentSystem != gen2 {
		t.Fatalf("facts history of dev05: %v %+v", err, facts)
	}
	if _, errs, err := w.admin("facts", "nosuchdevice", "--since", "1h"); err == nil || !strings.Contains(errs, "nosuchdevice") {
		t.Fatalf("facts of an unknown device: %v %s", err, errs)
	}
	if _, errs, err := w.admin("facts", "dev05", "--since", "soon"); err == nil || errs == "" {
		t.Fatalf("facts --since soon: %v", err)
	}

	var recs []model.AuditRecord
	if err := json.Unmarshal([]byte(w.mustAdmin("--json", "audit", "ls")), &recs); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, r := range recs {
		found = found || r.Verb == "deploy" && r.Result == model.AuditOK && r.Admin == "owner"
	}
	if !found {
		t.Fatal("the deploy is not in the audit trail")
	}
}

// A health check failing in batch 2 with --max-failures 0 pauses the
// rollout with later batches untouched; resume after the fix completes it.
// With --on-failure revert, earlier batches return to their previous
// release.
func TestRolloutPauseResumeRevert(t *testing.T) {
	w := newFleetWorld(t)
	gen1, gen2, gen3 := fakePath("gen1"), fakePath("gen2"), fakePath("gen3")
	w.addDevices(10, "developers", gen1)
	w.release("rel-1", gen1)
	w.release("rel-2", gen2)
	w.release("rel-3", gen3)
	if _, errs, err := w.deployWait("--release", "rel-1", "--group", "developers", "--strategy", "all"); err != nil {
		t.Fatalf("rel-1: %v %s", err, errs)
	}

	// Batches of 1, 4, 5 devices in name order; dev03 is in batch 2.
	bad := w.devices[3]
	bad.bad.Store(&gen2)
	ro, errs, err := w.deployWait("--release", "rel-2", "--group", "developers", "--batches", "1,50%,100%", "--max-failures", "0")
	if err == nil || ro.State != model.RolloutPaused || ro.Batch != 1 {
		t.Fatalf("want paused in batch 2: %v %+v", err, ro.Rollout)
	}
	var badRow *model.RolloutProgress
	for i := range ro.Progress {
		if ro.Progress[i].Device == bad.id {
			badRow = &ro.Progress[i]
		}
	}
	if badRow == nil || badRow.State != model.DeviceFailed || !strings.Contains(badRow.Error, "app-health") {
		t.Fatalf("failing device row: %+v", badRow)
	}
	if cur, _ := bad.act.state(); cur != gen1 {
		t.Fatalf("failing device not rolled back: %s", cur)
	}
	if !w.onSystem(gen1, w.devices[5:]...) {
		t.Fatal("later batches were touched while paused")
	}
	_ = errs

	bad.bad.Store(nil) // the fix
	w.mustAdmin("rollout", "resume", ro.ID)
	out, errs, err := w.admin("--json", "rollout", "watch", ro.ID)
	if err != nil {
		t.Fatalf("watch after resume: %v %s", err, errs)
	}
	if last := lastRollout(t, out); last.State != model.RolloutSucceeded {
		t.Fatalf("after resume: %+v", last.Rollout)
	}
	if !w.onSystem(gen2, w.devices...) || bad.act.switchCount(gen2) != 2 {
		t.Fatalf("after resume: not all on gen2 (bad device switched %d times)", bad.act.switchCount(gen2))
	}
	if _, errs, err := w.admin("rollout", "resume", ro.ID); err == nil || !strings.Contains(errs, "only a paused rollout") {
		t.Fatalf("resume of a finished rollout: %v %s", err, errs)
	}

	// Now with revert: dev03 fails gen3 in batch 2; batches 1 and 2 go back
	// to rel-2, batch 3 never sees gen3.
	bad.bad.Store(&gen3)
	ro, _, err = w.deployWait("--release", "rel-3", "--group", "developers", "--batches", "1,50%,100%", "--on-failure", "revert")
	if err == nil || ro.State != model.RolloutReverted {
		t.Fatalf("want reverted: %v %+v", err, ro.Rollout)
	}
	poll.Until(w.t, 30*time.Second, "earlier batches back on gen2", func() bool { return w.onSystem(gen2, w.devices...) })
	for _, d := range w.devices[5:] {
		if d.act.switchCount(gen3) != 0 {
			t.Fatalf("%s of batch 3 switched to gen3", d.name)
		}
	}
}

// kill -9 of the coordinator mid-rollout: after a restart the rollout
// finishes, each device applied exactly once, and no event is lost.
func TestRolloutSurvivesCoordinatorKill(t *testing.T) {
	w := newFleetWorld(t)
	gen1, gen2 := fakePath("gen1"), fakePath("gen2")
	w.addDevices(4, "developers", gen1)
	w.release("rel-2", gen2)
	canary := w.devices[0]
	gate, switching := canary.act.holdSwitch()

	id := strings.TrimSpace(w.mustAdmin("deploy", "--release", "rel-2", "--group", "developers", "--strategy", "canary", "--health-timeout", "2m"))
	select {
	case <-switching:
	case <-w.ctx.Done():
		t.Fatal("the canary never started switching")
	}
	w.killCoordinator()
	close(gate) // the canary finishes its apply while the coordinator is down
	poll.Until(w.t, 10*time.Second, "canary on gen2", func() bool { return w.onSystem(gen2, canary) })
	w.startCoordinator()

	out, errs, err := w.admin("--json", "rollout", "watch", id)
	if err != nil {
		t.Fatalf("watch after restart: %v %s", err, errs)
	}
	if last := lastRollout(t, out); last.State != model.RolloutSucceeded || last.Counts[model.DeviceSucceeded] != 4 {
		t.Fatalf("after restart: %+v", last.Rollout)
	}
	for _, d := range w.devices {
		if d.act.switchCount(gen2) != 1 {
			t.Fatalf("%s switched to gen2 %d times", d.name, d.act.switchCount(gen2))
		}
	}
	// Every device's final event for this rollout is in the stream, once.
	finals := w.finalEvents(id)
	for _, d := range w.devices {
		if finals[d.id] != 1 {
			t.Fatalf("%s: %d final events for the rollout, want 1 (all: %v)", d.name, finals[d.id], finals)
		}
	}
}

// finalEvents counts final events per device for rollout id, read from
// FLEET_EVENTS. No client can read the state (it lives in the CORE
// account), so the coordinator process is stopped and the data dir opened
// by an embedded coordinator, the way an operator inspects a backup.
func (w *fleetWorld) finalEvents(id string) map[string]int {
	w.t.Helper()
	if err := w.coord.Process.Signal(syscall.SIGTERM); err != nil {
		w.t.Fatal(err)
	}
	w.coordWG.Wait()
	cfg := broker.DefaultConfig()
	cfg.DataDir, cfg.Listen, cfg.HTTP = w.dataDir, "127.0.0.1:0", ""
	c, err := broker.Start(w.ctx, cfg, zerolog.Nop())
	if err != nil {
		w.t.Fatal(err)
	}
	defer c.Close()
	cons, err := c.JetStream().OrderedConsumer(w.ctx, subjects.StreamEvents, jetstream.OrderedConsumerConfig{})
	if err != nil {
		w.t.Fatal(err)
	}
	counts := map[string]int{}
	for {
		batch, err := cons.Fetch(500, jetstream.FetchMaxWait(500*time.Millisecond))
		if err != nil {
			w.t.Fatal(err)
		}
		n := 0
		for m := range batch.Messages() {
			n++
			var ev model.Event
			if json.Unmarshal(m.Data(), &ev) == nil && ev.RolloutID == id && ev.Result.Final() {
				counts[ev.Device]++
			}
		}
		if n == 0 {
			return counts
		}
	}
}
