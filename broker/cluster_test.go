package broker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/admin"
	"fleet/broker"
	"fleet/internal/lockedbuf"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startCluster starts n coordinators routed to each other: the first data
// dir is initialised, the others get copies of its identity files.
func startCluster(t *testing.T, n int) []*broker.Coordinator {
	t.Helper()
	dirs := make([]string, n)
	ports := make([]int, n)
	for i := range n {
		dirs[i] = filepath.Join(t.TempDir(), fmt.Sprintf("c%d", i+1))
		ports[i] = freePort(t)
	}
	base := broker.DefaultConfig()
	base.DataDir = dirs[0]
	if _, err := broker.Init(base); err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs[1:] {
		if err := accounts.CopyIdentity(dirs[0], d); err != nil {
			t.Fatal(err)
		}
	}
	// The coordinators' logs, shown when the test fails.
	logs := &lockedbuf.Buffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("coordinator logs:\n%s", logs.String())
		}
	})
	cs := make([]*broker.Coordinator, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		cfg := broker.DefaultConfig()
		cfg.DataDir = dirs[i]
		cfg.Listen = "127.0.0.1:0"
		cfg.HTTP = ""
		cfg.ServerName = fmt.Sprintf("c%d", i+1)
		cfg.ClusterListen = fmt.Sprintf("127.0.0.1:%d", ports[i])
		for j := range n {
			if j != i {
				cfg.Routes = append(cfg.Routes, fmt.Sprintf("nats-route://127.0.0.1:%d", ports[j]))
			}
		}
		cfg.Replicas = 3
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Start's context bounds the coordinator's life too.
			cs[i], errs[i] = broker.Start(context.Background(), cfg, zerolog.New(logs).Level(zerolog.InfoLevel).With().Str("node", cfg.ServerName).Logger())
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			for _, c := range cs {
				if c != nil {
					c.Close()
				}
			}
			t.Fatalf("start c%d: %v", i+1, err)
		}
	}
	for _, c := range cs {
		t.Cleanup(c.Close)
	}
	return cs
}

// lockHolder is the server name in the rollout engine's lock ("" if free).
func lockHolder(t *testing.T, c *broker.Coordinator) string {
	t.Helper()
	kv, err := c.JetStream().KeyValue(context.Background(), subjects.BucketLocks)
	if err != nil {
		return ""
	}
	e, err := kv.Get(context.Background(), "rollout-engine")
	if err != nil {
		return ""
	}
	return string(e.Value())
}

func connectDevice(t *testing.T, url string, cr *accounts.Creds) (*nats.Conn, chan struct{}) {
	t.Helper()
	seed, _ := cr.Key.Seed()
	closed := make(chan struct{})
	nc, err := nats.Connect(url, nats.UserJWTAndSeed(cr.JWT, string(seed)),
		nats.CustomInboxPrefix(cr.InboxPrefix()),
		nats.NoReconnect(), nats.ClosedHandler(func(*nats.Conn) { close(closed) }),
		nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc, closed
}

// TestCluster runs three coordinators in one process: shared identity,
// R3 streams, requests answered through any node, revocations reaching
// every server, and the rollout engine moving when its leader stops.
func TestCluster(t *testing.T) {
	cs := startCluster(t, 3)
	ctx := context.Background()

	// Every stream and bucket is replicated on all three.
	for _, name := range []string{subjects.StreamFacts, subjects.StreamEvents, subjects.StreamAudit, "KV_" + subjects.BucketDevices, "KV_" + subjects.BucketLocks} {
		s, err := cs[0].JetStream().Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		info := s.CachedInfo()
		if info.Config.Replicas != 3 || info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
			t.Errorf("stream %s: replicas %d, cluster %+v", name, info.Config.Replicas, info.Cluster)
		}
	}

	// The owner (creds of the first node, copied to all) talks to node 2;
	// devices enrol through node 3.
	owner, err := admin.Dial(ctx, cs[1].ClientURL(), filepath.Join(cs[1].Config().DataDir, accounts.AdminCredsFile))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(owner.Close)
	tok := createToken(t, owner, 3, false, "developers")
	stolen, _ := enrollAgent(t, cs[2], tok.Token, "stolen")
	other, _ := enrollAgent(t, cs[2], tok.Token, "other")
	kept, _ := enrollAgent(t, cs[2], tok.Token, "kept")
	devs, err := owner.Devices(ctx, "developers")
	if err != nil || len(devs) != 3 {
		t.Fatalf("devices through node 2: %v %+v", err, devs)
	}

	// A revocation made on node 1 disconnects a device on node 2 and is
	// refused on node 3.
	_, closed := connectDevice(t, cs[1].ClientURL(), stolen)
	start := time.Now()
	if err := cs[0].Revoke(ctx, stolen.PublicKey()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-closed:
		t.Logf("device on node 2 disconnected %v after the revocation on node 1", time.Since(start))
	case <-time.After(5 * time.Second):
		t.Fatal("device on node 2 still connected 5s after its revocation on node 1")
	}
	refused := func(i int, cr *accounts.Creds) bool {
		seed, _ := cr.Key.Seed()
		nc, err := nats.Connect(cs[i].ClientURL(), nats.UserJWTAndSeed(cr.JWT, string(seed)), nats.NoReconnect())
		if err == nil {
			nc.Close()
			return false
		}
		return strings.Contains(strings.ToLower(err.Error()), "authorization")
	}
	poll.Until(t, 5*time.Second, "revoked device refused on node 3", func() bool { return refused(2, stolen) })
	poll.Until(t, 5*time.Second, "node 2 knows the revocation", func() bool { return cs[1].Authority().IsRevoked(stolen.PublicKey()) })

	// A later revocation on node 2 keeps node 1's: its account JWT merges
	// the revocations it received.
	if err := cs[1].Revoke(ctx, other.PublicKey()); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 5*time.Second, "second revocation refused on node 1", func() bool { return refused(0, other) })
	for i := range cs {
		if !refused(i, stolen) {
			t.Fatalf("the first revocation was undone on node %d by the second", i+1)
		}
	}

	// Revocations at the same moment on two nodes never undo each other:
	// both keys are refused on every node, round after round (in about
	// 0.1 s; the deadline leaves room for a loaded CI machine, an undo
	// never converges).
	for round := range 5 {
		x, err := cs[0].Authority().NewUser(subjects.RoleAgent, "x", 0)
		if err != nil {
			t.Fatal(err)
		}
		y, err := cs[0].Authority().NewUser(subjects.RoleAgent, "y", 0)
		if err != nil {
			t.Fatal(err)
		}
		errs := make(chan error, 2)
		go func() { errs <- cs[0].Revoke(ctx, x.PublicKey()) }()
		go func() { errs <- cs[1].Revoke(ctx, y.PublicKey()) }()
		for range 2 {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		start := time.Now()
		poll.Until(t, 10*time.Second, fmt.Sprintf("round %d: both concurrent revocations refused on every node", round), func() bool {
			for i := range cs {
				if !refused(i, x) || !refused(i, y) {
					return false
				}
			}
			return true
		})
		t.Logf("round %d: both refused everywhere %v after the concurrent revocations", round, time.Since(start))
	}

	// Audit entries appended on three nodes form one chain.
	var wg sync.WaitGroup
	for i := range cs {
		wg.Go(func() {
			cl, err := admin.Dial(ctx, cs[i].ClientURL(), filepath.Join(cs[i].Config().DataDir, accounts.AdminCredsFile))
			if err != nil {
				t.Error(err)
				return
			}
			defer cl.Close()
			for range 5 {
				if _, err := cl.CreateToken(ctx, model.TokenCreate{Groups: []string{"chain"}, Uses: 1, TTL: time.Hour}); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if b := model.CheckAuditChain(auditRecords(t, cs[0])); len(b) != 0 {
		t.Fatalf("audit appended on three nodes at once: chain broken at %v", b)
	}

	// The engine leader stops; another coordinator takes the lock.
	var leader string
	poll.Until(t, 15*time.Second, "an engine leader", func() bool { leader = lockHolder(t, cs[0]); return leader != "" })
	var rest []*broker.Coordinator
	var stoppedCfg broker.Config
	for _, c := range cs {
		if c.Config().ServerName == leader {
			stoppedCfg = c.Config()
			c.Close()
		} else {
			rest = append(rest, c)
		}
	}
	if len(rest) != 2 {
		t.Fatalf("lock holder %q is no coordinator", leader)
	}
	var next string
	poll.Until(t, 20*time.Second, "a new engine leader", func() bool {
		next = lockHolder(t, rest[0])
		return next != "" && next != leader
	})
	t.Logf("engine moved from %s to %s", leader, next)

	// A rollout created afterwards completes: the device on a surviving
	// node applies and reports.
	cl, err := admin.Dial(ctx, rest[1].ClientURL(), filepath.Join(rest[1].Config().DataDir, accounts.AdminCredsFile))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	nc, _ := connectDevice(t, rest[0].ClientURL(), kept)
	// Like an agent: the trigger asks it to read its desired state; it
	// answers with a signed event.
	if _, err := nc.Subscribe(subjects.DeviceNotify(kept.Site(), kept.PublicKey()), func(*nats.Msg) {
		m, err := nc.Request(subjects.DesiredGetFor(kept.PublicKey()), nil, 5*time.Second)
		if err != nil {
			t.Errorf("read desired state: %v", err)
			return
		}
		var r model.DesiredReply
		var des model.Desired
		if json.Unmarshal(m.Data, &r) != nil || json.Unmarshal(r.Desired, &des) != nil || des.StorePath == "" {
			return
		}
		ev := model.Event{Device: kept.PublicKey(), Time: time.Now(), State: model.StateReporting, Result: model.ResultSucceeded,
			RolloutID: des.RolloutID, ReleaseID: des.ReleaseID, StorePath: des.StorePath}
		signed, _ := model.Sign(kept.Key, model.PurposeEvent, ev)
		b, _ := json.Marshal(signed)
		if _, err := nc.Request(subjects.DeviceEvents(kept.PublicKey()), b, 5*time.Second); err != nil {
			t.Errorf("publish event: %v", err)
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	rel := recordRelease(t, rest[1], cl, "rel-cluster")
	var ro model.Rollout
	if err := cl.Call(ctx, subjects.VerbDeploy, true, model.DeployRequest{ReleaseID: rel.ID, Devices: []string{kept.PublicKey()}}, &ro); err != nil {
		t.Fatal(err)
	}
	var last *model.Rollout
	poll.Until(t, 20*time.Second, "rollout succeeded after the leader change", func() bool {
		last, err = cl.RolloutSummary(ctx, ro.ID)
		return err == nil && last.State == model.RolloutSucceeded
	})
	if last.Counts[model.DeviceSucceeded] != 1 {
		t.Errorf("rollout counts %v", last.Counts)
	}

	// The stopped node comes back: at once it shows the device connected to
	// another node as online (it asks the cluster, not only its own
	// server), before the device sends anything.
	<-closedWhenDone(t, cs, leader)
	back, err := broker.Start(ctx, stoppedCfg, zerolog.Nop())
	if err != nil {
		t.Fatalf("restart %s: %v", leader, err)
	}
	t.Cleanup(back.Close)
	if !back.Presence().Online(kept.PublicKey()) {
		t.Fatal("a rejoined node shows a device connected to another node offline")
	}
}

// closedWhenDone is the Done channel of the coordinator named name.
func closedWhenDone(t *testing.T, cs []*broker.Coordinator, name string) <-chan struct{} {
	t.Helper()
	for _, c := range cs {
		if c.Config().ServerName == name {
			return c.Done()
		}
	}
	t.Fatalf("no coordinator %s", name)
	return nil
}
