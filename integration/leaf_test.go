package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/agent"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// A remote site: `fleet-admin leaf config` writes the config of a standard
// nats-server (the real binary) that runs as a leaf node of the
// coordinator. A device at the site enrols and gets a rollout through it,
// and the leaf holds it to its own subjects.
func TestSiteLeafNode(t *testing.T) {
	w := newFleetWorldLeaf(t)
	site := filepath.Join(t.TempDir(), "berlin")
	leafListen := freeAddr(t)
	out := w.mustAdmin("leaf", "config", "--site", "berlin", "--out", site, "--listen", leafListen)
	if !strings.Contains(out, "leaf.conf") {
		t.Fatalf("leaf config printed %q", out)
	}
	for _, f := range []string{"leaf.conf", "leaf.creds", "leaf-system.creds", "operator.jwt"} {
		if fi, err := os.Stat(filepath.Join(site, f)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v", f, err, fi)
		}
	}
	// The same site dir twice is refused, nothing overwritten.
	before, _ := os.ReadFile(filepath.Join(site, "leaf.conf"))
	if _, errs, err := w.admin("leaf", "config", "--site", "berlin", "--out", site); err == nil || !strings.Contains(errs, "exists already") {
		t.Fatalf("second leaf config: %v %s", err, errs)
	}
	if after, _ := os.ReadFile(filepath.Join(site, "leaf.conf")); !bytes.Equal(before, after) {
		t.Fatal("leaf.conf was overwritten")
	}
	if _, errs, err := w.admin("leaf", "config", "--site", "Bad Site", "--out", t.TempDir()); err == nil || !strings.Contains(errs, "site") {
		t.Fatalf("bad site name: %v %s", err, errs)
	}

	runLeafServer(t, filepath.Join(site, "leaf.conf"))
	poll.Until(w.t, 20*time.Second, "leaf node up", func() bool {
		c, err := net.Dial("tcp", leafListen)
		if err == nil {
			c.Close()
		}
		return err == nil
	})

	// Enrol and run a device at the site: it only knows the leaf.
	gen1, gen2 := fakePath("gen1"), fakePath("gen2")
	token := strings.TrimSpace(w.mustAdmin("token", "create", "--group", "berlin", "--site", "berlin", "--uses", "1", "--ttl", "1h"))
	leafURL := "nats://" + leafListen
	dev, cr := w.startDevice("berlin-1", token, leafURL, gen1)
	act := dev.act

	w.release("rel-2", gen2)
	ro, errs, err := w.deployWait("--release", "rel-2", "--group", "berlin", "--strategy", "all")
	if err != nil || ro.State != model.RolloutSucceeded {
		t.Fatalf("rollout through the leaf: %v %s %+v", err, errs, ro.Rollout)
	}
	if cur, _ := act.state(); cur != gen2 {
		t.Fatalf("device at the site runs %s", cur)
	}

	// At the leaf the device is held to its own subjects: another device's
	// facts are a permissions violation, reported by the leaf itself.
	violations := make(chan error, 4)
	seed, _ := cr.Key.Seed()
	probe, err := nats.Connect(leafURL, nats.UserJWTAndSeed(cr.JWT, string(seed)),
		nats.CustomInboxPrefix(cr.InboxPrefix()),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { violations <- err }))
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	other := "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NFCNIB"
	if err := probe.Publish(subjects.DeviceFacts(other), []byte("{}")); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-violations:
		if !strings.Contains(err.Error(), "Permissions Violation") {
			t.Fatalf("unexpected error: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("publishing to another device's facts through the leaf was not refused")
	}

	// The site's device is online at the hub by its signed reports (a
	// site cannot report presence itself).
	poll.Until(w.t, 10*time.Second, "site device online at the hub", func() bool {
		for _, d := range w.devicesJSON(t) {
			if d.Name == "berlin-1" {
				return d.Online
			}
		}
		return false
	})
	// A revocation at the hub reaches the leaf at once: the device is cut
	// off at the site and refused there after.
	w.mustAdmin("devices", "revoke", "berlin-1")
	poll.Until(w.t, 10*time.Second, "revoked device refused at the leaf", func() bool {
		c, err := nats.Connect(leafURL, nats.UserJWTAndSeed(cr.JWT, string(seed)), nats.NoReconnect(), nats.Timeout(2*time.Second))
		if err == nil {
			c.Close()
			return false
		}
		return strings.Contains(strings.ToLower(err.Error()), "authorization")
	})
	poll.Until(w.t, 10*time.Second, "revoked device's connection closed at the leaf", func() bool { return !probe.IsConnected() })
}

// newFleetWorldLeaf is a fleet world whose coordinator listens for leaf
// nodes.
func newFleetWorldLeaf(t *testing.T) *fleetWorld {
	t.Helper()
	return newFleetWorldWith(t, "--leafnode-listen", freeAddr(t))
}

// A site's leaf credentials in the wrong hands: a plain nats-server whose
// local clients are unauthenticated, linked with the site's leaf.creds and
// leaf-system.creds. It attacks the hub the ways a review did and is
// refused each time; the owner's view of admins, devices, rollouts and the
// audit is what it was.
func TestRogueLeafIsContained(t *testing.T) {
	w := newFleetWorldLeaf(t)
	gen1, gen2 := fakePath("gen1"), fakePath("gen2")
	// Two devices on the hub, with a rollout that waits for their results.
	w.addDevices(2, "hq", gen1)
	hubA, hubB := w.devices[0], w.devices[1]
	w.release("rel-2", gen2)
	for _, d := range w.devices {
		bad := gen2
		d.bad.Store(&bad) // gen2 fails its health check: the rollout fails
	}

	site := filepath.Join(t.TempDir(), "rogue")
	w.mustAdmin("leaf", "config", "--site", "rogue", "--out", site)
	hub := w.hubLeafURL(t, site)
	listen := freeAddr(t)
	conf := filepath.Join(site, "rogue.conf")
	// The rogue's own accounts: APP for its clients, SYS for its system
	// link; nobody authenticates at the rogue.
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(`listen: %q
accounts { APP: { users: [ {user: app, password: app} ] }, SYS: { users: [ {user: sys, password: sys} ] } }
system_account: SYS
no_auth_user: app
leafnodes { remotes: [
  { urls: [%q], credentials: %q, account: APP },
  { urls: [%q], credentials: %q, account: SYS },
] }
`, listen, hub, filepath.Join(site, "leaf.creds"), hub, filepath.Join(site, "leaf-system.creds"))), 0o600); err != nil {
		t.Fatal(err)
	}
	rogue := exec.Command(natsServerBin, "-c", conf)
	var logb bytes.Buffer
	rogue.Stdout, rogue.Stderr = &logb, &logb
	if err := rogue.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = rogue.Process.Kill()
		_ = rogue.Wait()
		if t.Failed() {
			t.Logf("rogue leaf log:\n%s", tail(logb.String(), 3000))
		}
	})

	before := w.ownerView(t)
	var nc *nats.Conn
	poll.Until(w.t, 20*time.Second, "rogue leaf up and linked", func() bool {
		var err error
		if nc == nil {
			if nc, err = nats.Connect("nats://"+listen, nats.CustomInboxPrefix(subjects.DeviceInboxPrefix("rogue", hubA.id))); err != nil {
				nc = nil
				return false
			}
		}
		// Device traffic crosses: an enrollment request is answered.
		_, err = nc.Request(subjects.Enroll, []byte("{}"), 500*time.Millisecond)
		return err == nil
	})
	defer nc.Close()
	var seen []string
	var mu sync.Mutex
	sub, err := nc.Subscribe(">", func(m *nats.Msg) { mu.Lock(); seen = append(seen, m.Subject); mu.Unlock() })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}

	// The JetStream API, the admin API and another site's inboxes are not
	// on the link at all.
	for _, subj := range []string{
		"$JS." + subjects.Domain + ".API.STREAM.DELETE." + subjects.StreamAudit,
		"$JS.API.STREAM.DELETE." + subjects.StreamAudit,
		"$JS." + subjects.Domain + ".API.STREAM.INFO.KV_" + subjects.BucketAdmins,
		subjects.APIReadVerb(subjects.VerbDevices),
		subjects.APIWriteVerb(subjects.VerbAdminAdd),
	} {
		if m, err := nc.Request(subj, nil, time.Second); err == nil {
			t.Fatalf("rogue leaf reached %s: %s", subj, m.Data)
		}
	}

	// Reading a hub device's desired state: the answer goes only into that
	// device's own inbox at the hub, never to the rogue site.
	if m, err := nc.Request(subjects.DesiredGetFor(hubA.id), nil, time.Second); err == nil {
		t.Fatalf("rogue leaf read %s's desired state: %s", hubA.name, m.Data)
	}
	// Replaying a desired state (or any trigger) to a hub device: the link
	// may not publish into device inboxes.
	if err := nc.Publish(subjects.DeviceNotify(subjects.DefaultSite, hubB.id), []byte(`{"release_id":"old"}`)); err != nil {
		t.Fatal(err)
	}
	// Forging results: a "succeeded" event for each hub device, unsigned,
	// and signed by a key of its own; the rollout must not count them.
	rogueKey, _ := nkeys.CreateUser()
	for _, d := range w.devices {
		ev := model.Event{Device: d.id, Time: time.Now(), State: model.StateReporting, Result: model.ResultSucceeded, ReleaseID: "rel-2", StorePath: gen2}
		raw, _ := json.Marshal(ev)
		forged, _ := model.Sign(rogueKey, model.PurposeEvent, ev)
		fb, _ := json.Marshal(forged)
		for _, body := range [][]byte{raw, fb} {
			if err := nc.Publish(subjects.DeviceEvents(d.id), body); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Inventing devices: facts for 2,000 new keys, each signed by itself.
	for range 2000 {
		kp, _ := nkeys.CreateUser()
		pub, _ := kp.PublicKey()
		f, _ := model.Sign(kp, model.PurposeFacts, model.Facts{Device: pub, Hostname: "ghost"})
		b, _ := json.Marshal(f)
		if err := nc.Publish(subjects.DeviceFacts(pub), b); err != nil {
			t.Fatal(err)
		}
	}
	// Faking presence over the system link: a connect event for a device
	// the hub never saw. The link may not publish it.
	ghost, _ := nkeys.CreateUser()
	ghostPub, _ := ghost.PublicKey()
	sysConn, err := nats.Connect("nats://"+listen, nats.UserInfo("sys", "sys"))
	if err != nil {
		t.Fatal(err)
	}
	defer sysConn.Close()
	connect := fmt.Sprintf(`{"type":"io.nats.server.advisory.v1.client_connect","server":{"id":"NROGUE"},"client":{"id":1,"user":%q,"acc":%q}}`, ghostPub, before.fleetAccount)
	if err := sysConn.Publish("$SYS.ACCOUNT."+before.fleetAccount+".CONNECT", []byte(connect)); err != nil {
		t.Fatal(err)
	}
	if err := sysConn.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	// Forget what the rogue's own clients sent.
	mu.Lock()
	seen = nil
	mu.Unlock()

	// The real rollout runs: both devices fail their health check, and the
	// forged successes changed nothing.
	ro, _, _ := w.deployWait("--release", "rel-2", "--group", "hq", "--strategy", "all", "--max-failures", "0")
	if ro.State == model.RolloutSucceeded || ro.Counts[model.DeviceSucceeded] != 0 {
		t.Fatalf("rollout counted forged results: %+v", ro.Rollout)
	}

	// Traffic at the hub (an enrollment, admin calls, the devices' own
	// requests and reports) never reached the rogue site.
	token := strings.TrimSpace(w.mustAdmin("token", "create", "--group", "x", "--uses", "1", "--ttl", "1h"))
	if _, err := agent.LoadOrEnroll(w.ctx, agent.EnrollOptions{Servers: []string{"nats://" + w.listen}, StateDir: t.TempDir(),
		Token: token, Hostname: "hub-dev", Log: zerolog.Nop()}); err != nil {
		t.Fatal(err)
	}
	w.mustAdmin("devices", "ls")
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	for _, s := range seen {
		if s == subjects.Enroll || strings.HasPrefix(s, "fleet.") || strings.HasPrefix(s, "_INBOX_U") ||
			strings.HasPrefix(s, "_INBOX_DEV."+subjects.DefaultSite+".") || strings.HasPrefix(s, "$JS") {
			t.Errorf("rogue leaf received %s", s)
		}
	}
	mu.Unlock()

	// Answering the coordinator's account pushes first, with an error of
	// its own: the link may not answer them, and a revocation goes through.
	forge, err := sysConn.Subscribe("$SYS.REQ.ACCOUNT.*.CLAIMS.UPDATE", func(m *nats.Msg) {
		_ = m.Respond([]byte(`{"error":{"code":500,"description":"the rogue site says no"}}`))
	})
	if err != nil {
		t.Fatal(err)
	}
	defer forge.Unsubscribe()
	if err := sysConn.Flush(); err != nil {
		t.Fatal(err)
	}
	if out, errs, err := w.admin("devices", "revoke", hubB.name); err != nil {
		t.Fatalf("revoke with a rogue site answering the account push: %v %s %s", err, out, errs)
	}

	// The owner's view: the same admins, only the real devices (none
	// invented, the ghost not online), and an audit that verifies.
	after := w.ownerView(t)
	if after.admins != before.admins {
		t.Errorf("admins changed: %s -> %s", before.admins, after.admins)
	}
	if after.devices != before.devices+1 { // hub-dev, enrolled above
		t.Errorf("devices: %d before, %d after (one enrolled)", before.devices, after.devices)
	}
	for _, d := range w.devicesJSON(t) {
		if d.ID == ghostPub || d.Name == "ghost" {
			t.Errorf("invented device listed: %+v", d)
		}
	}
	if out := w.mustAdmin("audit", "verify"); !strings.Contains(out, "0 accepted entries with a bad signature") {
		t.Fatalf("audit verify: %s", out)
	}
}

// ownerState is what the owner sees of the fleet, to compare before and
// after an attack.
type ownerState struct {
	admins       string
	devices      int
	fleetAccount string
}

func (w *fleetWorld) ownerView(t *testing.T) ownerState {
	t.Helper()
	var s ownerState
	s.admins = w.mustAdmin("admin", "ls", "--json")
	s.devices = len(w.devicesJSON(t))
	cr, err := accounts.ReadCreds(w.creds)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := cr.Claims()
	if err != nil {
		t.Fatal(err)
	}
	s.fleetAccount = uc.IssuerAccount
	return s
}

// hubLeafURL reads the hub URL leaf config wrote into leaf.conf.
func (w *fleetWorld) hubLeafURL(t *testing.T, site string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(site, "leaf.conf"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`urls: \["([^"]+)"\]`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no hub url in leaf.conf:\n%s", b)
	}
	return string(m[1])
}

// runLeafServer runs the real nats-server with conf until the test ends,
// and shows its log when the test failed.
func runLeafServer(t *testing.T, conf string) {
	t.Helper()
	leaf := exec.Command(natsServerBin, "-c", conf)
	var leafLog bytes.Buffer
	leaf.Stdout, leaf.Stderr = &leafLog, &leafLog
	if err := leaf.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = leaf.Process.Signal(syscall.SIGTERM)
		_ = leaf.Wait()
		if t.Failed() {
			t.Logf("leaf log:\n%s", tail(leafLog.String(), 3000))
		}
	})
}
