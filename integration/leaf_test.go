package integration

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/agent"
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
	for _, f := range []string{"leaf.conf", "leaf.creds", "operator.jwt"} {
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
	w.waitFor(20*time.Second, "leaf node up", func() bool {
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
	w.waitFor(30*time.Second, "enrolment through the leaf", func() bool {
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
		nats.CustomInboxPrefix(subjects.InboxPrefix(cr.PublicKey())),
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
}

// newFleetWorldLeaf is a fleet world whose coordinator listens for leaf
// nodes.
func newFleetWorldLeaf(t *testing.T) *fleetWorld {
	t.Helper()
	return newFleetWorldWith(t, "--leafnode-listen", freeAddr(t))
}
