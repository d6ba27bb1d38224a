package broker

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"fleet/model"
	"fleet/subjects"
)

// Bounds of token-create, so a typo does not mint a token for years.
const (
	maxTokenTTL  = 365 * 24 * time.Hour
	maxTokenUses = 1_000_000
)

// tokenRecord is a token in fleet_tokens (key: its id). Only the hash of
// the secret is stored: a reader of the bucket cannot enrol devices.
type tokenRecord struct {
	model.TokenInfo
	Hash string `json:"hash"`
}

func hashSecret(secret string) string {
	h := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(h[:])
}

// matches compares the secret's hash in constant time.
func (t *tokenRecord) matches(secret string) bool {
	return subtle.ConstantTimeCompare([]byte(hashSecret(secret)), []byte(t.Hash)) == 1
}

func decodeArgs(args json.RawMessage, v any) error {
	if len(args) == 0 {
		return badRequest("request has no arguments")
	}
	if err := json.Unmarshal(args, v); err != nil {
		return badRequest("arguments do not decode: %v", err)
	}
	return nil
}

func checkGroups(groups []string) error {
	if len(groups) == 0 {
		return badRequest("at least one group is needed (--group)")
	}
	for _, g := range groups {
		if err := model.CheckGroup(g); err != nil {
			return badRequest("%v", err)
		}
	}
	return nil
}

func (s *services) tokenCreate(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	var a model.TokenCreate
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	if err := checkGroups(a.Groups); err != nil {
		return nil, err
	}
	if a.Uses < 1 || a.Uses > maxTokenUses {
		return nil, badRequest("--uses %d: give 1 to %d", a.Uses, maxTokenUses)
	}
	if a.TTL < time.Minute || a.TTL > maxTokenTTL {
		return nil, badRequest("--ttl %s: give 1m to %s", a.TTL, maxTokenTTL)
	}
	if a.Site == subjects.DefaultSite {
		a.Site = ""
	}
	if a.Site != "" && !subjects.ValidSite(a.Site) {
		return nil, badRequest("--site %q: use lower-case letters, digits and - (e.g. berlin)", a.Site)
	}
	var idb [8]byte
	var secret [32]byte
	_, _ = rand.Read(idb[:])
	_, _ = rand.Read(secret[:])
	id := hex.EncodeToString(idb[:])
	sec := base64.RawURLEncoding.EncodeToString(secret[:])

	// The bearer credential lets a new device connect and send fleet.enroll,
	// nothing else; it expires with the token and is revoked with it. Its
	// seed is thrown away: the enroll template is bearer.
	bk, err := nkeys.CreateUser()
	if err != nil {
		return nil, err
	}
	bpub, _ := bk.PublicKey()
	bearer, err := s.c.auth.IssueSiteUser(subjects.RoleEnroll, bpub, "enroll-"+id, a.Site, a.TTL)
	if err != nil {
		return nil, err
	}
	now := s.now().UTC()
	groups := slices.Clone(a.Groups)
	slices.Sort(groups)
	groups = slices.Compact(groups)
	rec := tokenRecord{
		TokenInfo: model.TokenInfo{
			ID: id, Groups: groups, Uses: a.Uses, ExpiresAt: now.Add(a.TTL).Truncate(time.Second),
			Approval: a.Approval, Site: a.Site, CreatedAt: now, CreatedBy: who.Name, BearerKey: bpub,
		},
		Hash: hashSecret(sec),
	}
	b, _ := json.Marshal(rec)
	if _, err := s.tokens.Create(ctx, id, b); err != nil {
		return nil, fmt.Errorf("store token: %w", err)
	}
	return model.TokenCreated{
		Token: model.FormatToken(id, sec, bearer), ID: id, Groups: groups,
		Uses: a.Uses, ExpiresAt: rec.ExpiresAt, Approval: a.Approval, Site: a.Site,
	}, nil
}

func (s *services) tokensList(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	q, err := listQuery(raw)
	if err != nil {
		return nil, err
	}
	var out []model.TokenInfo
	err = eachKey(ctx, s.tokens, func(e jetstream.KeyValueEntry) {
		var t tokenRecord
		if json.Unmarshal(e.Value(), &t) == nil {
			out = append(out, t.TokenInfo)
		}
	})
	if err != nil {
		return nil, err
	}
	return pageOf(out, func(t *model.TokenInfo) string { return timeKey(t.CreatedAt, t.ID) }, q.Page, capList)
}

// listQuery decodes the argument of a listing verb without filters.
func listQuery(raw json.RawMessage) (model.ListQuery, error) {
	var q model.ListQuery
	if len(raw) > 0 {
		if err := decodeArgs(raw, &q); err != nil {
			return q, err
		}
	}
	return q, nil
}

func (s *services) tokenRevoke(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.TokenRef
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	if !model.ValidTokenID(a.ID) {
		return nil, badRequest("%q is not a token id (see fleet-admin token ls)", a.ID)
	}
	var out model.TokenInfo
	err := s.updateToken(ctx, a.ID, func(t *tokenRecord) error {
		t.Revoked = true
		out = t.TokenInfo
		return nil
	})
	if err != nil {
		return nil, err
	}
	// Close any connection still using the bearer credential, and refuse it
	// from now on even before it expires.
	if err := s.c.Revoke(ctx, out.BearerKey); err != nil {
		return nil, fmt.Errorf("token %s is marked revoked, but revoking its credential failed (run the command again): %w", a.ID, err)
	}
	return out, nil
}

// updateToken applies fn to token id with a revision check, retrying when
// another writer came first: two enrollments cannot both spend the last use.
// Enrolments on this coordinator spend a token's uses in batches (spend),
// so retries here are rare.
func (s *services) updateToken(ctx context.Context, id string, fn func(*tokenRecord) error) error {
	for range 20 {
		e, err := s.tokens.Get(ctx, id)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return notFound("no token %q (see fleet-admin token ls)", id)
		}
		if err != nil {
			return fmt.Errorf("read token %s: %w", id, err)
		}
		var t tokenRecord
		if err := json.Unmarshal(e.Value(), &t); err != nil {
			return fmt.Errorf("token record %s is damaged: %w", id, err)
		}
		if err := fn(&t); err != nil {
			return err
		}
		b, _ := json.Marshal(t)
		if _, err := s.tokens.Update(ctx, id, b, e.Revision()); err == nil {
			return nil
		} else if !errors.Is(err, jetstream.ErrKeyExists) {
			return fmt.Errorf("write token %s: %w", id, err)
		}
	}
	return &apiError{model.CodeInternal, "token " + id + " is busy; retry"}
}

// followKV hands each update of watcher w to fn (nil once the values
// there at the start are all delivered) until ctx ends or the watch does,
// then stops the watch. One loop for every bucket the coordinator keeps
// in memory.
func followKV(ctx context.Context, w jetstream.KeyWatcher, fn func(jetstream.KeyValueEntry)) {
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			fn(e)
		}
	}
}

// eachKey calls fn with every live entry of kv.
func eachKey(ctx context.Context, kv jetstream.KeyValue, fn func(jetstream.KeyValueEntry)) error {
	return eachWatched(ctx, kv, fn, jetstream.IgnoreDeletes())
}

// eachEntry is eachKey with the keys deleted or purged too: their markers
// (Operation not Put), at the revision a write over them expects.
func eachEntry(ctx context.Context, kv jetstream.KeyValue, fn func(jetstream.KeyValueEntry)) error {
	return eachWatched(ctx, kv, fn)
}

// lastEntry is key's latest entry, a delete or purge marker included
// (jetstream.ErrKeyNotFound: the key never had one).
func lastEntry(ctx context.Context, kv jetstream.KeyValue, key string) (jetstream.KeyValueEntry, error) {
	h, err := kv.History(ctx, key)
	if err != nil {
		return nil, err
	}
	return h[len(h)-1], nil
}

func eachWatched(ctx context.Context, kv jetstream.KeyValue, fn func(jetstream.KeyValueEntry), opts ...jetstream.WatchOpt) error {
	// A watcher delivers every current value in one stream of messages,
	// where listing keys and getting each would cost a round trip per key.
	w, err := kv.WatchAll(ctx, opts...)
	if err != nil {
		return fmt.Errorf("read %s: %w", kv.Bucket(), err)
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return fmt.Errorf("read %s: watch ended", kv.Bucket())
			}
			if e == nil {
				return nil // every current value has been delivered
			}
			fn(e)
		case <-ctx.Done():
			return fmt.Errorf("read %s: %w", kv.Bucket(), ctx.Err())
		}
	}
}
