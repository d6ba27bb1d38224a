package broker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"fleet/accounts"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// adminConn connects over TCP with DIR/admin.creds the way fleet-admin does,
// and returns JetStream through the fleet's domain.
func adminConn(t *testing.T, c *Coordinator) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	path := filepath.Join(c.Config().DataDir, accounts.AdminCredsFile)
	cr, err := accounts.ReadCreds(path)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(c.ClientURL(), nats.UserCredentials(path),
		nats.CustomInboxPrefix(cr.InboxPrefix()), nats.NoReconnect())
	if err != nil {
		t.Fatalf("connect with %s: %v", path, err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.NewWithDomain(nc, c.Config().Domain)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// stateOutOfReach checks that even the owner's creds reach no JetStream:
// the state lives in CORE, which no client belongs to.
func stateOutOfReach(t *testing.T, c *Coordinator) {
	t.Helper()
	_, js := adminConn(t, c)
	if _, err := js.AccountInfo(ctxT(t, 3*time.Second)); err == nil {
		t.Error("the owner's creds reached a JetStream API")
	}
	if _, err := js.KeyValue(ctxT(t, 3*time.Second), subjects.BucketAdmins); err == nil {
		t.Error("the owner's creds opened fleet_admins")
	}
}

func TestInitRunCreatesStreamsAndBuckets(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	cfg := testConfig(dir)
	cfg.HTTP = "127.0.0.1:0"
	cfg.FactsRetention = 48 * time.Hour
	cfg.FactsHistory = 7
	cfg.EventsRetention = 72 * time.Hour
	c := startCoordinator(t, cfg)

	for _, f := range []string{accounts.OperatorJWTFile, accounts.OperatorSeedFile, accounts.AdminCredsFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("run on an empty dir did not create %s: %v", f, err)
		}
	}
	// Ready once the device index has caught up (a moment on an empty
	// fleet).
	poll.Telling(t, 10*time.Second, "ready", func() (bool, string) {
		err := c.Ready()
		return err == nil, fmt.Sprint(err)
	})
	if c.ClientURL() == "nats://127.0.0.1:0" || c.ClientURL() == "nats://127.0.0.1:4222" {
		t.Errorf("--listen 127.0.0.1:0 should pick a free port, got %s", c.ClientURL())
	}
	ctx := ctxT(t, 30*time.Second)
	stateOutOfReach(t, c)
	js := c.JetStream()

	streams := map[string]func(jetstream.StreamConfig) []string{
		subjects.StreamFacts: func(sc jetstream.StreamConfig) (bad []string) {
			if !slices.Equal(sc.Subjects, []string{subjects.AllFacts}) {
				bad = append(bad, "subjects")
			}
			if sc.MaxAge != 48*time.Hour || sc.MaxMsgsPerSubject != 7 || !sc.AllowDirect || sc.Discard != jetstream.DiscardOld {
				bad = append(bad, "limits")
			}
			return bad
		},
		subjects.StreamEvents: func(sc jetstream.StreamConfig) (bad []string) {
			if !slices.Equal(sc.Subjects, []string{subjects.AllEvents}) {
				bad = append(bad, "subjects")
			}
			if sc.MaxAge != 72*time.Hour || sc.MaxMsgsPerSubject <= 0 || !sc.AllowDirect {
				bad = append(bad, "limits")
			}
			return bad
		},
		subjects.StreamAudit: func(sc jetstream.StreamConfig) (bad []string) {
			if !slices.Equal(sc.Subjects, []string{subjects.AllAudit}) {
				bad = append(bad, "subjects")
			}
			if !sc.DenyDelete || !sc.DenyPurge {
				bad = append(bad, "deny delete/purge")
			}
			if sc.MaxAge != 0 || sc.MaxMsgs > 0 {
				bad = append(bad, "the audit trail must not expire")
			}
			// Bounded in bytes only, a share of the state's disk.
			if sc.MaxBytes <= 0 || sc.MaxBytes > cfg.Limits.JetStreamDisk/5 {
				bad = append(bad, "audit size bound")
			}
			return bad
		},
	}
	for _, name := range []string{subjects.StreamFacts, subjects.StreamEvents} {
		check := streams[name]
		streams[name] = func(sc jetstream.StreamConfig) []string {
			bad := check(sc)
			if sc.MaxBytes <= 0 || sc.MaxBytes > cfg.Limits.JetStreamDisk/2 || sc.MaxMsgSize <= 0 || sc.MaxMsgSize > 256<<10 {
				bad = append(bad, "size bounds")
			}
			return bad
		}
	}
	for name, check := range streams {
		s, err := js.Stream(ctx, name)
		if err != nil {
			t.Errorf("stream %s: %v", name, err)
			continue
		}
		sc := s.CachedInfo().Config
		if sc.Replicas != 1 || sc.Storage != jetstream.FileStorage || sc.Retention != jetstream.LimitsPolicy {
			t.Errorf("stream %s: replicas %d storage %v retention %v", name, sc.Replicas, sc.Storage, sc.Retention)
		}
		if bad := check(sc); len(bad) > 0 {
			t.Errorf("stream %s: wrong %v in %+v", name, bad, sc)
		}
	}

	history := map[string]int64{
		subjects.BucketDevices: 5, subjects.BucketDesired: 5, subjects.BucketReleases: 1,
		subjects.BucketRollouts: 5, subjects.BucketTokens: 1, subjects.BucketAdmins: 5,
		subjects.BucketEscrow: 10, subjects.BucketPayloads: 5, subjects.BucketLocks: 1, subjects.BucketNonces: 1, subjects.BucketRevocations: 1, subjects.BucketClaims: 1, subjects.BucketGroups: 5,
	}
	if len(history) != len(subjects.Buckets) {
		t.Fatalf("test knows %d buckets, subjects lists %d", len(history), len(subjects.Buckets))
	}
	for _, b := range subjects.Buckets {
		kv, err := js.KeyValue(ctx, b)
		if err != nil {
			t.Errorf("bucket %s: %v", b, err)
			continue
		}
		st, err := kv.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		sc := st.(*jetstream.KeyValueBucketStatus).StreamInfo().Config
		if sc.Replicas != 1 || sc.Storage != jetstream.FileStorage || sc.MaxMsgsPerSubject != history[b] || !sc.AllowDirect || sc.MaxMsgSize <= 0 {
			t.Errorf("bucket %s: replicas %d storage %v history %d (want %d) direct %v max value %d",
				b, sc.Replicas, sc.Storage, sc.MaxMsgsPerSubject, history[b], sc.AllowDirect, sc.MaxMsgSize)
		}
		switch b {
		case subjects.BucketDesired:
			rp := sc.RePublish
			if rp == nil || rp.Source != subjects.DesiredRepublishSource || rp.Destination != subjects.DesiredRepublishDest || !rp.HeadersOnly {
				t.Errorf("fleet_desired RePublish = %+v", rp)
			}
		case subjects.BucketLocks:
			if sc.MaxAge != 15*time.Second {
				t.Errorf("fleet_locks TTL = %v, want 15s", sc.MaxAge)
			}
		case subjects.BucketNonces:
			// Nonces outlive the freshness window of the requests they guard.
			if sc.MaxAge <= 2*model.MaxSkew {
				t.Errorf("fleet_nonces TTL = %v, want more than %v", sc.MaxAge, 2*model.MaxSkew)
			}
		default:
			if sc.RePublish != nil || sc.MaxAge != 0 {
				t.Errorf("bucket %s: RePublish %+v MaxAge %v", b, sc.RePublish, sc.MaxAge)
			}
		}
	}

	// The audit trail really refuses deletes and purges.
	ack, err := js.Publish(ctx, subjects.AuditSubject("test"), []byte(`{"verb":"test"}`))
	if err != nil {
		t.Fatal(err)
	}
	audit, err := js.Stream(ctx, subjects.StreamAudit)
	if err != nil {
		t.Fatal(err)
	}
	if err := audit.DeleteMsg(ctx, ack.Sequence); err == nil {
		t.Error("deleting an audit message succeeded")
	}
	if err := audit.Purge(ctx); err == nil {
		t.Error("purging the audit stream succeeded")
	}
	if m, err := audit.GetMsg(ctx, ack.Sequence); err != nil || string(m.Data) != `{"verb":"test"}` {
		t.Errorf("audit message after delete/purge attempts: %v", err)
	}

	// HTTP health endpoints.
	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get("http://" + c.HTTPAddr() + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s = %d %s", path, resp.StatusCode, body)
		}
	}
	stop(t, c)
	if err := c.Ready(); err == nil {
		t.Error("Ready after Close")
	}
}

func TestRestartKeepsState(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(dir)
	c := startCoordinator(t, cfg)
	ctx := ctxT(t, 30*time.Second)
	auth := c.Authority()
	opPub, fleetPub, agentKey := auth.OperatorPublicKey(), auth.FleetAccount(), auth.RoleKey(subjects.RoleAgent)

	js := c.JetStream()
	devices, err := js.KeyValue(ctx, subjects.BucketDevices)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := devices.Put(ctx, "d1", []byte(`{"name":"laptop"}`)); err != nil {
		t.Fatal(err)
	}
	dev, err := auth.NewUser(subjects.RoleAgent, "d", 0)
	if err != nil {
		t.Fatal(err)
	}
	ack, err := js.Publish(ctx, subjects.DeviceFacts(dev.PublicKey()), []byte(`{"hostname":"laptop"}`))
	if err != nil {
		t.Fatal(err)
	}
	stop(t, c)

	// Start again on the same dir, with a changed facts history: the stream
	// is updated in place.
	cfg.FactsHistory = 3
	c2 := startCoordinator(t, cfg)
	auth2 := c2.Authority()
	if auth2.OperatorPublicKey() != opPub || auth2.FleetAccount() != fleetPub || auth2.RoleKey(subjects.RoleAgent) != agentKey {
		t.Error("the fleet's keys changed across a restart")
	}
	ajs := c2.JetStream()
	kv, err := ajs.KeyValue(ctx, subjects.BucketDevices)
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(ctx, "d1")
	if err != nil || string(e.Value()) != `{"name":"laptop"}` {
		t.Fatalf("device record after restart: %v", err)
	}
	facts, err := ajs.Stream(ctx, subjects.StreamFacts)
	if err != nil {
		t.Fatal(err)
	}
	m, err := facts.GetLastMsgForSubject(ctx, subjects.DeviceFacts(dev.PublicKey()))
	if err != nil || m.Sequence != ack.Sequence || string(m.Data) != `{"hostname":"laptop"}` {
		t.Fatalf("facts after restart: %v", err)
	}
	if got := facts.CachedInfo().Config.MaxMsgsPerSubject; got != 3 {
		t.Errorf("facts history after restart with --facts-history 3 = %d", got)
	}
	// A user issued before the restart still connects.
	mustDial(t, c2.ClientURL(), dev)
}

func TestStartStopsWithContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	c, err := Start(ctx, testConfig(t.TempDir()), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)

	// The server runs in operator mode: an anonymous connect is refused
	// while it runs, so only valid creds tell a running server from a
	// stopped one.
	cr, err := accounts.ReadCreds(filepath.Join(c.Config().DataDir, accounts.AdminCredsFile))
	if err != nil {
		t.Fatal(err)
	}
	seed, err := cr.Key.Seed()
	if err != nil {
		t.Fatal(err)
	}
	connect := func() (*nats.Conn, error) {
		return nats.Connect(c.ClientURL(), nats.UserJWTAndSeed(cr.JWT, string(seed)),
			nats.CustomInboxPrefix(cr.InboxPrefix()), nats.NoReconnect(), nats.Timeout(time.Second))
	}
	nc, err := connect()
	if err != nil {
		t.Fatalf("the owner's creds do not connect while the coordinator runs: %v", err)
	}
	nc.Close()

	cancel()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("coordinator still running 10s after its context ended")
	}
	nc, err = connect()
	if err == nil {
		nc.Close()
		t.Fatal("the owner's creds still connect after the coordinator stopped")
	}
	if isAuthError(err) {
		t.Fatalf("after stop: the server refused the creds (%v), so it is still running", err)
	}
	// nats.go reports a refused dial of its only server as ErrNoServers.
	if !errors.Is(err, nats.ErrNoServers) {
		t.Errorf("after stop: want %v (nothing listening), got %v", nats.ErrNoServers, err)
	}
	u, err := url.Parse(c.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	if conn, err := net.DialTimeout("tcp", u.Host, time.Second); err == nil {
		conn.Close()
		t.Errorf("%s still accepts TCP connections after stop", u.Host)
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial %s after stop: want connection refused, got %v", u.Host, err)
	}
}

func TestLeafnodeListen(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.LeafnodeListen = "127.0.0.1:0"
	c := startCoordinator(t, cfg)
	u := c.LeafURL()
	if u == "" || u == "nats-leaf://127.0.0.1:0" {
		t.Fatalf("LeafURL = %q, want the port actually listened on", u)
	}
}
