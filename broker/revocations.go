package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"fleet/subjects"
)

// Revocations live in the replicated fleet_revocations bucket, one key per
// revoked user key, written with Create and never deleted. The FLEET
// account JWT is derived from the whole bucket: every coordinator watches
// it and, whenever it learns of a key its JWT lacks, re-signs the JWT with
// every revocation and pushes it. Two revocations at once on two
// coordinators therefore cannot undo each other: whichever push comes last,
// the coordinator that made the incomplete one sees the other key next and
// pushes again.

// revocationRecord is the value of a fleet_revocations key.
type revocationRecord struct {
	// At is when the revocation takes effect (JWTs issued before are
	// refused), unix seconds.
	At int64 `json:"at"`
}

// Revoke revokes user keys: it records them in fleet_revocations and
// pushes the FLEET account JWT with every revocation. Their connections are
// closed at once and refused after, on every server.
func (c *Coordinator) Revoke(ctx context.Context, pubs ...string) error {
	return c.RevokeAt(ctx, time.Now(), pubs...)
}

// RevokeAt is Revoke as of now, the time the caller reports: JWTs issued
// up to the second after it are refused, however long the caller took to
// get here.
func (c *Coordinator) RevokeAt(ctx context.Context, now time.Time, pubs ...string) error {
	for _, p := range pubs {
		// The canonical form only: the server matches revocations by the
		// exact key string.
		if !subjects.ValidDeviceID(p) {
			return fmt.Errorf("%q is not a user public key", p)
		}
	}
	// One second of slack: a JWT issued in this very second is covered.
	at := now.Add(time.Second).Unix()
	b, _ := json.Marshal(revocationRecord{At: at})
	for _, p := range pubs {
		_, err := c.revocations.Create(ctx, p, b)
		if errors.Is(err, jetstream.ErrKeyExists) {
			// Revoked before: a JWT issued for the key since (a leaf
			// config that reused it) is revoked now too.
			err = c.laterRevocation(ctx, p, at, b)
		}
		if err != nil {
			return fmt.Errorf("record the revocation of %s: %w", p, err)
		}
	}
	return c.syncRevocations(ctx)
}

// laterRevocation moves key's recorded revocation forward to at (b), never
// back.
func (c *Coordinator) laterRevocation(ctx context.Context, key string, at int64, b []byte) error {
	for range 5 {
		e, err := c.revocations.Get(ctx, key)
		if err != nil {
			return err
		}
		var r revocationRecord
		if json.Unmarshal(e.Value(), &r) == nil && r.At >= at {
			return nil
		}
		if _, err = c.revocations.Update(ctx, key, b, e.Revision()); err == nil {
			return nil
		} else if !errors.Is(err, jetstream.ErrKeyExists) && !isWrongRevision(err) {
			return err
		}
	}
	return errors.New("the revocation changed under us five times: retry")
}

// syncRevocations makes the FLEET account JWT hold every revocation of the
// bucket and pushes it when that changed it, or when the last sync failed
// (its JWT may be signed here and never have reached the servers).
func (c *Coordinator) syncRevocations(ctx context.Context) (err error) {
	c.revMu.Lock()
	defer c.revMu.Unlock()
	defer func() { c.revPending = err != nil }()
	revs := map[string]int64{}
	err = eachKey(ctx, c.revocations, func(e jetstream.KeyValueEntry) {
		var r revocationRecord
		if json.Unmarshal(e.Value(), &r) == nil && r.At > 0 {
			revs[e.Key()] = r.At
		}
	})
	if err != nil {
		return fmt.Errorf("read revocations: %w", err)
	}
	tok, err := c.auth.MergeRevocations(revs)
	if err != nil {
		return err
	}
	if tok == "" {
		if !c.revPending {
			return nil
		}
		// Nothing new, but the last push may not have gone out: push what
		// this coordinator holds now (newer than anything it pushed).
		if _, tok, err = c.auth.AccountJWTs(); err != nil {
			return err
		}
	}
	push := c.PushAccount
	if c.pushHook != nil {
		push = c.pushHook
	}
	return push(ctx, tok)
}

// revocationRetry is how often a failed sync of the revocations is tried
// again: nothing else would push the JWT before the next revocation or a
// restart.
const revocationRetry = 5 * time.Second

// retryRevocations syncs the revocations again while the last sync
// failed, until ctx ends.
func (c *Coordinator) retryRevocations(ctx context.Context) {
	every(ctx, revocationRetry, func() {
		c.revMu.Lock()
		pending := c.revPending
		c.revMu.Unlock()
		if !pending {
			return
		}
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := c.syncRevocations(sctx)
		cancel()
		if err != nil {
			c.log.Error().Err(err).Msg("revocations not applied yet; retrying")
		} else {
			c.log.Info().Msg("revocations applied after a failed attempt")
		}
	})
}

// startRevocations seeds the bucket with the revocations the account JWT
// already holds (made before the bucket existed, or restored), then keeps
// the JWT in step with the bucket until ctx ends.
func (c *Coordinator) startRevocations(ctx context.Context) error {
	kv, err := c.js.KeyValue(ctx, subjects.BucketRevocations)
	if err != nil {
		return fmt.Errorf("bucket %s: %w", subjects.BucketRevocations, err)
	}
	c.revocations = kv
	for key, at := range c.auth.Revocations() {
		b, _ := json.Marshal(revocationRecord{At: at})
		if _, err := kv.Create(ctx, key, b); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
			return fmt.Errorf("record revocation of %s: %w", key, err)
		}
	}
	if err := c.syncRevocations(ctx); err != nil {
		return err
	}
	w, err := kv.WatchAll(ctx, jetstream.UpdatesOnly())
	if err != nil {
		return fmt.Errorf("watch %s: %w", subjects.BucketRevocations, err)
	}
	go followKV(ctx, w, func(e jetstream.KeyValueEntry) {
		if e == nil {
			return
		}
		// Known, and as of this record's time or later: nothing to do. A
		// record moved later (laterRevocation) is not known yet.
		var r revocationRecord
		if at, ok := c.auth.RevokedAt(e.Key()); ok && (json.Unmarshal(e.Value(), &r) != nil || at >= r.At) {
			return
		}
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := c.syncRevocations(sctx); err != nil {
			c.log.Error().Err(err).Str("key", e.Key()).Msg("revocation not applied yet; retrying")
		}
	})
	go c.retryRevocations(ctx)
	return nil
}

// revokedKey reports whether user key pub is revoked, by the bucket (the
// authority) or the account JWT.
func (c *Coordinator) revokedKey(ctx context.Context, pub string) (bool, error) {
	if c.auth.IsRevoked(pub) {
		return true, nil
	}
	_, err := c.revocations.Get(ctx, pub)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("look up revocation of %s: %w", pub, err)
	}
	return true, nil
}
