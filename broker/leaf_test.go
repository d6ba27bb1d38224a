package broker

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"

	"fleet/accounts"
	"fleet/internal/poll"
	"fleet/subjects"
)

// startLeaf runs a site's leaf node the way DESIGN §7 describes: a plain
// nats-server in operator mode with the same operator, the account JWTs
// preloaded, and a remote to the coordinator with a leaf user's creds.
func startLeaf(t *testing.T, c *Coordinator) *server.Server {
	t.Helper()
	auth := c.Authority()
	leafUser, err := auth.NewUser(subjects.RoleLeaf, "site-berlin", 0)
	if err != nil {
		t.Fatal(err)
	}
	credsPath := filepath.Join(t.TempDir(), "leaf.creds")
	if err := accounts.WriteCreds(credsPath, leafUser); err != nil {
		t.Fatal(err)
	}
	oc, err := jwt.DecodeOperatorClaims(auth.OperatorJWT)
	if err != nil {
		t.Fatal(err)
	}
	sysJWT, fleetJWT, err := auth.AccountJWTs()
	if err != nil {
		t.Fatal(err)
	}
	res := &server.MemAccResolver{}
	if err := res.Store(auth.SystemAccount(), sysJWT); err != nil {
		t.Fatal(err)
	}
	if err := res.Store(auth.FleetAccount(), fleetJWT); err != nil {
		t.Fatal(err)
	}
	hub, err := url.Parse(c.LeafURL())
	if err != nil {
		t.Fatal(err)
	}
	ls, err := server.NewServer(&server.Options{
		ServerName:       "leaf-berlin",
		Host:             "127.0.0.1",
		Port:             server.RANDOM_PORT,
		NoSigs:           true,
		NoLog:            true,
		TrustedOperators: []*jwt.OperatorClaims{oc},
		SystemAccount:    auth.SystemAccount(),
		AccountResolver:  res,
		LeafNode: server.LeafNodeOpts{Remotes: []*server.RemoteLeafOpts{{
			URLs:         []*url.URL{hub},
			Credentials:  credsPath,
			LocalAccount: auth.FleetAccount(),
		}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	ls.Start()
	t.Cleanup(func() {
		ls.Shutdown()
		ls.WaitForShutdown()
	})
	if !ls.ReadyForConnections(10 * time.Second) {
		t.Fatal("leaf server not ready")
	}
	poll.Until(t, 10*time.Second, "leaf connection to the coordinator", func() bool {
		return ls.NumLeafNodes() == 1 && c.Server().NumLeafNodes() == 1
	})
	return ls
}

// Devices at a site connect to the leaf node; the leaf enforces the same
// role templates, and JetStream is reached through the domain.
func TestAgentThroughLeafNode(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.LeafnodeListen = "127.0.0.1:0"
	c := startCoordinator(t, cfg)
	ls := startLeaf(t, c)
	auth := c.Authority()
	ctx := ctxT(t, 30*time.Second)
	a, err := auth.NewUser(subjects.RoleAgent, "a", 0)
	if err != nil {
		t.Fatal(err)
	}
	b, err := auth.NewUser(subjects.RoleAgent, "b", 0)
	if err != nil {
		t.Fatal(err)
	}
	A, B := a.PublicKey(), b.PublicKey()
	desired, err := c.JetStream().KeyValue(ctx, subjects.BucketDesired)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{A, B} {
		if _, err := desired.Put(ctx, id, []byte("desired-"+id)); err != nil {
			t.Fatal(err)
		}
	}

	cl := mustDial(t, ls.ClientURL(), a)
	fleetAcc, err := c.Server().LookupAccount(auth.FleetAccount())
	if err != nil {
		t.Fatal(err)
	}

	// Facts cross the leaf into the hub's stream.
	j, err := jetstream.NewWithDomain(cl.Conn, cfg.Domain)
	if err != nil {
		t.Fatal(err)
	}
	leafAcc, err := ls.LookupAccount(auth.FleetAccount())
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, "the hub's stream and JetStream API interest at the leaf", func() bool {
		return leafAcc.SubscriptionInterest(subjects.DeviceFacts(A)) &&
			leafAcc.SubscriptionInterest(subjects.DesiredDirectGet(cfg.Domain, A))
	})
	if ack, err := j.Publish(ctx, subjects.DeviceFacts(A), []byte(`{"site":"berlin"}`)); err != nil || ack.Stream != subjects.StreamFacts {
		t.Fatalf("facts through the leaf: %v %v", ack, err)
	}

	// Direct get of its own desired state through the domain.
	m, err := cl.RequestWithContext(ctxT(t, 5*time.Second), subjects.DesiredDirectGet(cfg.Domain, A), nil)
	if err != nil || string(m.Data) != "desired-"+A {
		t.Fatalf("direct get through the leaf: %v %v", m, err)
	}

	// The RePublish reaches the device at the site.
	s, err := cl.SubscribeSync(subjects.DeviceDesired(A))
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Flush(); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, "the agent's interest reaching the hub", func() bool {
		return fleetAcc.SubscriptionInterest(subjects.DeviceDesired(A))
	})
	if _, err := desired.Put(ctx, A, []byte("release-2")); err != nil {
		t.Fatal(err)
	}
	if m, err := s.NextMsg(5 * time.Second); err != nil || string(m.Data) != "release-2" {
		t.Fatalf("RePublish through the leaf: %v %v", m, err)
	}

	// The leaf server refuses another device's subjects itself.
	if err := cl.Publish(subjects.DeviceFacts(B), []byte("spoof")); err != nil {
		t.Fatal(err)
	}
	cl.errs.waitViolation(t, 5*time.Second, "Publish", subjects.DeviceFacts(B))
	subB, err := cl.SubscribeSync(subjects.DeviceAll(B))
	if err != nil {
		t.Fatal(err)
	}
	defer subB.Unsubscribe()
	cl.errs.waitViolation(t, 5*time.Second, "Subscription", subjects.DeviceAll(B))
	other := subjects.DesiredDirectGet(cfg.Domain, B)
	rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res := make(chan error, 1)
	go func() {
		m, err := cl.RequestWithContext(rctx, other, nil)
		if err == nil {
			err = fmt.Errorf("got %q", m.Data)
		}
		res <- err
	}()
	cl.errs.waitViolation(t, 5*time.Second, "Publish", other)
	// A refused request never completes; end it.
	cancel()
	if err := <-res; err == nil || !errors.Is(err, context.Canceled) {
		t.Fatalf("direct get of another device's key through the leaf: %v", err)
	}
}
