package broker_test

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/admin"
	"fleet/agent"
	"fleet/broker"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// hostActions stand in for the host's reboot and rollback: they count.
type hostActions struct {
	mu                 sync.Mutex
	reboots, rollbacks int
	reloads            []string
}

func (h *hostActions) ReloadUnit(_ context.Context, unit string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.reloads = append(h.reloads, unit)
	return nil
}

func (h *hostActions) reloaded() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.reloads...)
}

func (h *hostActions) Reboot(context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.reboots++
	return nil
}

func (h *hostActions) Rollback(context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.rollbacks++
	return nil
}

func (h *hostActions) counts() (int, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.reboots, h.rollbacks
}

// idleActivator runs one system and never changes it.
type idleActivator struct{}

func (idleActivator) Current(context.Context) (string, error)     { return "/nix/store/idle", nil }
func (idleActivator) Fetch(context.Context, string, string) error { return nil }
func (idleActivator) Snapshot(context.Context) (agent.Generation, error) {
	return agent.Generation{System: "/nix/store/idle"}, nil
}
func (idleActivator) Switch(context.Context, string, model.Action) error { return nil }
func (idleActivator) Rollback(context.Context, agent.Generation, model.Action) error {
	return nil
}
func (idleActivator) Active(context.Context, string, model.Action) (bool, error) { return false, nil }

// mdmDevice is an enrolled device running the real agent loop.
type mdmDevice struct {
	id      string
	dir     string
	creds   *accounts.Creds
	host    string
	actions *hostActions
	// enc is the disk encryption its facts report (nil: none).
	enc  *model.Encryption
	stop func()
}

// runDevice enrols a device with token and runs the real agent for it,
// trusting signer's commands; mdm adds to its MDM options. It returns once
// the coordinator counts the device online.
func runDevice(t *testing.T, c *broker.Coordinator, token, host, signer string, mdm func(*agent.MDMOptions)) *mdmDevice {
	t.Helper()
	return runDeviceEnc(t, c, token, host, signer, nil, mdm)
}

// runDeviceEnc is runDevice for a device whose facts report enc.
func runDeviceEnc(t *testing.T, c *broker.Coordinator, token, host, signer string, enc *model.Encryption, mdm func(*agent.MDMOptions)) *mdmDevice {
	t.Helper()
	cr, dir := enrollAgent(t, c, token, host)
	d := &mdmDevice{id: cr.PublicKey(), dir: dir, creds: cr, actions: &hostActions{}, host: host, enc: enc}
	startAgent(t, c, d, signer, mdm)
	return d
}

// startAgent runs the real agent loop of d until the test ends (or d.stop).
func startAgent(t *testing.T, c *broker.Coordinator, d *mdmDevice, signer string, mdm func(*agent.MDMOptions)) {
	t.Helper()
	cr, host := d.creds, d.host
	o := agent.MDMOptions{Actions: d.actions}
	if mdm != nil {
		mdm(&o)
	}
	ag, err := agent.New(agent.Options{
		DeviceID: d.id, Key: cr.Key, Site: cr.Site(), Hostname: host, StateDir: d.dir,
		ReleaseSigners: []string{signer}, Activator: idleActivator{},
		HealthDeadline: time.Second, ReconnectWithin: time.Second, ApplyTimeout: time.Minute,
		FactsInterval: time.Hour, Log: zerolog.Nop(), MDM: o,
		Facts: []agent.FactSource{agent.FactSourceFunc{N: "encryption", F: func(_ context.Context, f *model.Facts) error {
			if d.enc != nil {
				f.Encryption = *d.enc
			}
			return nil
		}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	nc, err := agent.Connect(ctx, cr, agent.ConnOptions{Servers: []string{c.ClientURL()}, Name: host, Log: zerolog.Nop(), OnConnect: ag.OnConnect})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = ag.Run(ctx, nc) }()
	var once sync.Once
	d.stop = func() {
		once.Do(func() {
			cancel()
			<-done
			nc.Close()
		})
	}
	t.Cleanup(d.stop)
	poll.Until(t, 10*time.Second, host+" online", func() bool { return c.Presence().Online(d.id) })
	// Online is the connection; the agent subscribes to its commands a
	// moment later.
	acc, err := c.Server().LookupAccount(c.Authority().FleetAccount())
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, host+" listens for commands", func() bool {
		return acc.SubscriptionInterest(subjects.DeviceCmd(cr.Site(), d.id))
	})
}

// commandEvents collects the command events of device id as the
// coordinator stored them (in CORE).
type commandEvents struct {
	mu  sync.Mutex
	evs []model.Event
}

func watchCommandEvents(t *testing.T, c *broker.Coordinator, id string) *commandEvents {
	t.Helper()
	w := &commandEvents{}
	sub, err := c.Conn().Subscribe(subjects.DeviceEvents(id), func(m *nats.Msg) {
		var ev model.Event
		if json.Unmarshal(m.Data, &ev) == nil && ev.State == model.StateCommand {
			w.mu.Lock()
			w.evs = append(w.evs, ev)
			w.mu.Unlock()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return w
}

// of returns the results the device reported for command id, in order.
func (w *commandEvents) of(id string) []model.Event {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []model.Event
	for _, ev := range w.evs {
		if ev.Command == id {
			out = append(out, ev)
		}
	}
	return out
}

// restartDevice runs the agent of d again, from its state dir.
func restartDevice(t *testing.T, c *broker.Coordinator, d *mdmDevice, signer string) *mdmDevice {
	t.Helper()
	d.stop()
	// Gone first, so "online" below is the new connection's.
	poll.Until(t, 10*time.Second, d.host+" offline", func() bool { return !c.Presence().Online(d.id) })
	n := &mdmDevice{id: d.id, dir: d.dir, creds: d.creds, host: d.host, actions: &hostActions{}, enc: d.enc}
	startAgent(t, c, n, signer, nil)
	return n
}

func readOwnerKey(t *testing.T, c *broker.Coordinator) nkeys.KeyPair {
	t.Helper()
	cr, err := accounts.ReadCreds(ownerCredsPath(c))
	if err != nil {
		t.Fatal(err)
	}
	return cr.Key
}

func pubOfKey(kp nkeys.KeyPair) string {
	p, _ := kp.PublicKey()
	return p
}

func mdmCtx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func mdmWantErr(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want one mentioning %q", parts)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not mention %q", err, p)
		}
	}
}

// mdmFleet starts a coordinator; it returns it with its owner's client and
// an enrolment token for uses devices in group.
func mdmFleet(t *testing.T, uses int, group string) (*broker.Coordinator, *admin.Client, string) {
	t.Helper()
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	return c, owner, createToken(t, owner, uses, false, group).Token
}

// wantNoReboots reports an error, naming what, when device d rebooted; it
// returns whether it did not.
func wantNoReboots(t *testing.T, d *mdmDevice, what string) bool {
	t.Helper()
	n, _ := d.actions.counts()
	if n != 0 {
		t.Errorf("%s: rebooted %d times", what, n)
	}
	return n == 0
}

// rawBucket returns every message a bucket's stream holds, history
// included.
func rawBucket(t *testing.T, c *broker.Coordinator, bucket string) [][]byte {
	t.Helper()
	ctx := mdmCtx(t, 10*time.Second)
	st, err := c.JetStream().Stream(ctx, subjects.KVStream(bucket))
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for seq := info.State.FirstSeq; info.State.Msgs > 0 && seq <= info.State.LastSeq; seq++ {
		if m, err := st.GetMsg(ctx, seq); err == nil {
			out = append(out, m.Data)
		}
	}
	return out
}

// deviceAsk sends a device request over nc (the device's own connection)
// and decodes the coordinator's answer.
func deviceAsk[T any](t *testing.T, nc *nats.Conn, subj string, body []byte) T {
	t.Helper()
	m, err := nc.Request(subj, body, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var r T
	_ = json.Unmarshal(m.Data, &r)
	return r
}
