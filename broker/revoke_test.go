package broker

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"fleet/accounts"
	"fleet/subjects"
)

// jsPublishFacts proves cl is connected and authorised: its facts get a
// PubAck.
func jsPublishFacts(t *testing.T, cl *client, domain string) {
	t.Helper()
	j, err := jetstream.NewWithDomain(cl.Conn, domain)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := j.Publish(ctxT(t, 5*time.Second), subjects.DeviceFacts(cl.pub), []byte(`{"up":true}`)); err != nil {
		t.Fatalf("facts of %s: %v", cl.pub, err)
	}
}

func TestRevokeDisconnectsAndRefuses(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(dir)
	c := startCoordinator(t, cfg)
	auth := c.Authority()
	newAgent := func(name string) *accounts.Creds {
		cr, err := auth.NewUser(subjects.RoleAgent, name, 0)
		if err != nil {
			t.Fatal(err)
		}
		return cr
	}
	bad, good := newAgent("stolen-laptop"), newAgent("desktop")
	badConn := mustDial(t, c.ClientURL(), bad)
	goodConn := mustDial(t, c.ClientURL(), good)
	jsPublishFacts(t, badConn, cfg.Domain)
	jsPublishFacts(t, goodConn, cfg.Domain)

	start := time.Now()
	if err := c.Revoke(ctxT(t, 5*time.Second), bad.PublicKey()); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	select {
	case <-badConn.closed:
		t.Logf("revoked device disconnected after %v", time.Since(start))
	case <-time.After(2 * time.Second):
		t.Fatal("revoked device still connected 2s after Revoke")
	}
	if !auth.IsRevoked(bad.PublicKey()) || auth.IsRevoked(good.PublicKey()) {
		t.Error("IsRevoked wrong")
	}

	// It cannot come back.
	if cl, err := dial(c.ClientURL(), bad); err == nil {
		cl.Close()
		t.Fatal("revoked device reconnected")
	} else if !isAuthError(err) {
		t.Fatalf("reconnect of a revoked device: want an authorization error, got %v", err)
	}

	// The other device never noticed.
	select {
	case <-goodConn.closed:
		t.Fatal("an unrevoked device was disconnected")
	default:
	}
	if !goodConn.IsConnected() {
		t.Fatal("an unrevoked device is not connected")
	}
	jsPublishFacts(t, goodConn, cfg.Domain)

	// Revoking nonsense fails and changes nothing.
	if err := c.Revoke(ctxT(t, 5*time.Second), "not-a-key"); err == nil {
		t.Error("Revoke of an invalid key succeeded")
	}
	jsPublishFacts(t, goodConn, cfg.Domain)

	// After a restart the revocation still holds.
	goodConn.Close()
	stop(t, c)
	c2 := startCoordinator(t, cfg)
	if !c2.Authority().IsRevoked(bad.PublicKey()) {
		t.Error("revocation lost across a restart")
	}
	if cl, err := dial(c2.ClientURL(), bad); err == nil {
		cl.Close()
		t.Fatal("revoked device connected after a restart")
	} else if !isAuthError(err) {
		t.Fatalf("revoked device after a restart: want an authorization error, got %v", err)
	}
	jsPublishFacts(t, mustDial(t, c2.ClientURL(), good), cfg.Domain)
	fresh, err := c2.Authority().NewUser(subjects.RoleAgent, "new", 0)
	if err != nil {
		t.Fatal(err)
	}
	jsPublishFacts(t, mustDial(t, c2.ClientURL(), fresh), cfg.Domain)
}
