package broker

import (
	"testing"
	"time"

	"fleet/accounts"
	"fleet/model"
	"fleet/subjects"
)

// jsPublishFacts proves cl is connected and authorised: its signed facts
// are stored.
func jsPublishFacts(t *testing.T, cl *client, cr *accounts.Creds) {
	t.Helper()
	if ack := sendSigned(t, cl, cr.Key, subjects.DeviceFacts(cl.pub), model.PurposeFacts, model.Facts{Device: cl.pub}); ack.Seq == 0 {
		t.Fatalf("facts of %s: %+v", cl.pub, ack)
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
		recordDevice(t, c, cr.PublicKey(), subjects.DefaultSite)
		return cr
	}
	bad, good := newAgent("stolen-laptop"), newAgent("desktop")
	badConn := mustDial(t, c.ClientURL(), bad)
	goodConn := mustDial(t, c.ClientURL(), good)
	jsPublishFacts(t, badConn, bad)
	jsPublishFacts(t, goodConn, good)

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
	jsPublishFacts(t, goodConn, good)

	// Revoking nonsense fails and changes nothing.
	if err := c.Revoke(ctxT(t, 5*time.Second), "not-a-key"); err == nil {
		t.Error("Revoke of an invalid key succeeded")
	}
	jsPublishFacts(t, goodConn, good)

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
	jsPublishFacts(t, mustDial(t, c2.ClientURL(), good), good)
	fresh, err := c2.Authority().NewUser(subjects.RoleAgent, "new", 0)
	if err != nil {
		t.Fatal(err)
	}
	recordDevice(t, c2, fresh.PublicKey(), subjects.DefaultSite)
	jsPublishFacts(t, mustDial(t, c2.ClientURL(), fresh), fresh)
}
