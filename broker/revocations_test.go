package broker

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"fleet/internal/poll"
	"fleet/subjects"
)

// A revocation whose account push fails is still applied: the coordinator
// pushes again on its own (the JWT was signed here and never reached the
// server), and the revoked key is refused by the real server.
func TestRevocationPushRetried(t *testing.T) {
	f := startVis(t, false)
	c := f.c
	cr, err := c.auth.NewUser(subjects.RoleAgent, "lost-push", 0)
	if err != nil {
		t.Fatal(err)
	}
	connects := func() (bool, error) {
		seed, _ := cr.Key.Seed()
		nc, err := nats.Connect(c.ClientURL(), nats.UserJWTAndSeed(cr.JWT, string(seed)), nats.NoReconnect())
		if err == nil {
			nc.Close()
			return true, nil
		}
		if strings.Contains(strings.ToLower(err.Error()), "authorization") {
			return false, nil
		}
		return false, err
	}
	if ok, err := connects(); !ok {
		t.Fatalf("before the revocation the key does not connect: %v", err)
	}

	// The first two pushes are lost: the revocation's own, and the one
	// its bucket watch may try at once; after that only the periodic
	// retry is left to push.
	c.revMu.Lock()
	lost := 0
	c.pushHook = func(ctx context.Context, tok string) error {
		if lost < 2 {
			lost++
			return errors.New("push lost (test)")
		}
		return c.PushAccount(ctx, tok)
	}
	c.revMu.Unlock()

	if err := c.Revoke(context.Background(), cr.PublicKey()); err == nil || !strings.Contains(err.Error(), "push lost") {
		t.Fatalf("Revoke with its push lost: %v", err)
	}
	// The push was lost: the server still lets the key in.
	if ok, err := connects(); !ok {
		t.Fatalf("the lost push reached the server after all: %v", err)
	}
	start := time.Now()
	poll.Telling(t, 4*revocationRetry, "the revoked key refused by the server", func() (bool, string) {
		ok, err := connects()
		if err != nil {
			return false, err.Error()
		}
		return !ok, "still connects"
	})
	t.Logf("refused %v after the lost push", time.Since(start).Round(time.Millisecond))
	c.revMu.Lock()
	defer c.revMu.Unlock()
	if c.revPending {
		t.Error("a sync is still pending after the retry pushed")
	}
}
