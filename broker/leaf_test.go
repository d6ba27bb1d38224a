package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"

	"fleet/accounts"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// startLeaf runs a site's leaf node the way DESIGN §7 describes: a plain
// nats-server in operator mode with the same operator, the account JWTs
// preloaded, and a remote to the coordinator with a leaf user's creds.
func startLeaf(t *testing.T, c *Coordinator) *server.Server {
	t.Helper()
	auth := c.Authority()
	lk := newKey(t)
	tok, err := auth.IssueSiteUser(subjects.RoleLeaf, pubOf(lk), "site-berlin", "berlin", 0)
	if err != nil {
		t.Fatal(err)
	}
	leafUser := &accounts.Creds{JWT: tok, Key: lk}
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
// role templates, and the link carries the site's device traffic only.
func TestAgentThroughLeafNode(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.LeafnodeListen = "127.0.0.1:0"
	c := startCoordinator(t, cfg)
	ls := startLeaf(t, c)
	auth := c.Authority()
	ctx := ctxT(t, 30*time.Second)
	newAgent := func(site string) (*accounts.Creds, string) {
		kp := newKey(t)
		tok, err := auth.IssueSiteUser(subjects.RoleAgent, pubOf(kp), "dev", site, 0)
		if err != nil {
			t.Fatal(err)
		}
		recordDevice(t, c, pubOf(kp), site)
		return &accounts.Creds{JWT: tok, Key: kp}, pubOf(kp)
	}
	a, A := newAgent("berlin")
	_, B := newAgent("berlin")
	desired, err := c.JetStream().KeyValue(ctx, subjects.BucketDesired)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{A, B} {
		if _, err := desired.Put(ctx, id, []byte(`{"release_id":"r-`+id[:8]+`"}`)); err != nil {
			t.Fatal(err)
		}
	}

	cl := mustDial(t, ls.ClientURL(), a)
	fleetAcc, err := c.Server().LookupAccount(auth.FleetAccount())
	if err != nil {
		t.Fatal(err)
	}
	leafAcc, err := ls.LookupAccount(auth.FleetAccount())
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, "the coordinator's interest at the leaf", func() bool {
		return leafAcc.SubscriptionInterest(subjects.DeviceFacts(A)) && leafAcc.SubscriptionInterest(subjects.DesiredGetFor(A))
	})

	// Signed facts cross the leaf; the coordinator stores them.
	if ack := sendSigned(t, cl, a.Key, subjects.DeviceFacts(A), model.PurposeFacts, model.Facts{Device: A, Hostname: "at-berlin"}); ack.Error != "" || ack.Seq == 0 {
		t.Fatalf("facts through the leaf: %+v", ack)
	}

	// Its own desired state, answered into its own inbox at the site.
	m, err := cl.RequestWithContext(ctxT(t, 5*time.Second), subjects.DesiredGetFor(A), nil)
	if err != nil {
		t.Fatalf("desired state through the leaf: %v", err)
	}
	var dr model.DesiredReply
	if err := json.Unmarshal(m.Data, &dr); err != nil || !strings.Contains(string(dr.Desired), "r-"+A[:8]) {
		t.Fatalf("desired state through the leaf: %s %v", m.Data, err)
	}

	// The trigger reaches the device at the site.
	s, err := cl.SubscribeSync(subjects.DeviceNotify("berlin", A))
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Flush(); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, "the agent's interest reaching the hub", func() bool {
		return fleetAcc.SubscriptionInterest(subjects.DeviceNotify("berlin", A))
	})
	if _, err := desired.Put(ctx, A, []byte(`{"release_id":"r2"}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.NextMsg(5 * time.Second); err != nil {
		t.Fatalf("trigger through the leaf: %v", err)
	}

	// The leaf server refuses another device's subjects itself.
	if err := cl.Publish(subjects.DeviceFacts(B), []byte("spoof")); err != nil {
		t.Fatal(err)
	}
	cl.errs.waitViolation(t, 5*time.Second, "Publish", subjects.DeviceFacts(B))
	inboxB := subjects.DeviceInboxPrefix("berlin", B) + ".>"
	subB, err := cl.SubscribeSync(inboxB)
	if err != nil {
		t.Fatal(err)
	}
	defer subB.Unsubscribe()
	cl.errs.waitViolation(t, 5*time.Second, "Subscription", inboxB)
	other := subjects.DesiredGetFor(B)
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
		t.Fatalf("another device's desired state through the leaf: %v", err)
	}
}

// sendSigned sends payload signed by kp as a device report and returns the
// coordinator's acknowledgement.
func sendSigned(t *testing.T, cl *client, kp nkeys.KeyPair, subj, purpose string, payload any) model.ReportAck {
	t.Helper()
	s, err := model.Sign(kp, purpose, payload)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(s)
	m, err := cl.Request(subj, b, 5*time.Second)
	if err != nil {
		t.Fatalf("send %s: %v", subj, err)
	}
	var ack model.ReportAck
	if err := json.Unmarshal(m.Data, &ack); err != nil {
		t.Fatalf("ack %q: %v", m.Data, err)
	}
	return ack
}
