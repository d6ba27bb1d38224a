package integration

import (
	"bytes"
	"context"
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

	leaf := exec.Command(natsServerBin, "-c", filepath.Join(site, "leaf.conf"))
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
	poll.Until(w.t, 20*time.Second, "leaf node up", func() bool {
		c, err := net.Dial("tcp", leafListen)
		if err == nil {
			c.Close()
		}
		return err == nil
	})

	// Enrol and run a device at the site: it only knows the leaf.
	gen1, gen2 := fakePath("gen1"), fakePath("gen2")
	token := strings.TrimSpace(w.mustAdmin("token", "create", "--group", "berlin", "--uses", "1", "--ttl", "1h"))
	dir := t.TempDir()
	leafURL := "nats://" + leafListen
	var cr *accounts.Creds
	var err error
	poll.Until(w.t, 30*time.Second, "enrolment through the leaf", func() bool {
		ctx, cancel := context.WithTimeout(w.ctx, 5*time.Second)
		defer cancel()
		cr, err = agent.LoadOrEnroll(ctx, agent.EnrollOptions{Servers: []string{leafURL}, StateDir: dir, Token: token, Hostname: "berlin-1", Log: zerolog.Nop()})
		return err == nil
	})
	act := newMemActivator(gen1)
	ag, err := agent.New(agent.Options{
		DeviceID: cr.PublicKey(), Hostname: "berlin-1", Domain: subjects.Domain, StateDir: dir,
		ReleaseSigners: []string{w.signer}, Activator: act, HealthDeadline: 10 * time.Second,
		ReconnectWithin: 30 * time.Second, ApplyTimeout: time.Minute, FactsInterval: time.Hour, Log: zerolog.Nop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	nc, err := agent.Connect(w.ctx, cr, agent.ConnOptions{Servers: []string{leafURL}, Name: "berlin-1", Log: zerolog.Nop(), OnConnect: ag.OnConnect})
	if err != nil {
		t.Fatal(err)
	}
	actx, stop := context.WithCancel(w.ctx)
	done := make(chan struct{})
	go func() { defer close(done); _ = ag.Run(actx, nc) }()
	t.Cleanup(func() { stop(); <-done; nc.Close() })

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

	// Presence crosses the leaf's system link: the site's device is online.
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

// A site's leaf credentials in the wrong hands: a plain nats-server with no
// accounts of its own, whose local clients are unauthenticated. The link
// carries device traffic only: no JetStream API (the audit stays
// undeletable), no admin API, no enrollment requests (they carry token
// secrets) and no admin replies.
func TestRogueLeafIsContained(t *testing.T) {
	w := newFleetWorldLeaf(t)
	site := filepath.Join(t.TempDir(), "rogue")
	w.mustAdmin("leaf", "config", "--site", "rogue", "--out", site)
	hub := w.hubLeafURL(t, site)
	listen := freeAddr(t)
	host, port, _ := net.SplitHostPort(listen)
	conf := filepath.Join(site, "rogue.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("listen: %q\nleafnodes { remotes: [ { urls: [%q], credentials: %q } ] }\n",
		net.JoinHostPort(host, port), hub, filepath.Join(site, "leaf.creds"))), 0o600); err != nil {
		t.Fatal(err)
	}
	rogue := exec.Command(natsServerBin, "-c", conf)
	var logb bytes.Buffer
	rogue.Stdout, rogue.Stderr = &logb, &logb
	if err := rogue.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rogue.Process.Kill(); _ = rogue.Wait() })

	var nc *nats.Conn
	poll.Until(w.t, 20*time.Second, "rogue leaf up and linked", func() bool {
		var err error
		if nc == nil {
			// A site client reads replies under a device inbox, the only
			// replies the link carries.
			if nc, err = nats.Connect("nats://"+listen, nats.CustomInboxPrefix(subjects.DeviceInboxPrefix("UROGUE"))); err != nil {
				nc = nil
				return false
			}
		}
		// Device traffic crosses: a direct get of a desired state answers.
		_, err = nc.Request(subjects.DesiredDirectGet(subjects.Domain, "UA"), nil, 500*time.Millisecond)
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
	nc.Flush()

	for _, subj := range []string{
		"$JS." + subjects.Domain + ".API.STREAM.DELETE." + subjects.StreamAudit,
		"$JS." + subjects.Domain + ".API.STREAM.INFO.KV_" + subjects.BucketAdmins,
		subjects.APIReadVerb(subjects.VerbDevices),
	} {
		if m, err := nc.Request(subj, nil, time.Second); err == nil {
			t.Fatalf("rogue leaf reached %s: %s", subj, m.Data)
		}
	}
	// Admin requests and an enrollment at the hub: nothing of them reaches
	// the rogue site. (Forget what the rogue client itself sent.)
	nc.Flush()
	mu.Lock()
	seen = nil
	mu.Unlock()
	token := strings.TrimSpace(w.mustAdmin("token", "create", "--group", "x", "--uses", "1", "--ttl", "1h"))
	if _, err := agent.LoadOrEnroll(w.ctx, agent.EnrollOptions{Servers: []string{"nats://" + w.listen}, StateDir: t.TempDir(),
		Token: token, Hostname: "hub-dev", Log: zerolog.Nop()}); err != nil {
		t.Fatal(err)
	}
	w.mustAdmin("devices", "ls")
	nc.Flush()
	mu.Lock()
	defer mu.Unlock()
	for _, s := range seen {
		if s == subjects.Enroll || strings.HasPrefix(s, "fleet.api.") || strings.HasPrefix(s, "_INBOX_U") || strings.HasPrefix(s, "$JS") {
			t.Fatalf("rogue leaf received %s (all: %v)", s, seen)
		}
	}
	// And the audit stream is still there.
	if out := w.mustAdmin("audit", "verify"); !strings.Contains(out, "0 accepted entries with a bad signature") {
		t.Fatalf("audit verify: %s", out)
	}
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
