package broker

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"fleet/model"
	"fleet/subjects"
)

// bucketConfigs are the KV buckets of DESIGN §3 with their limits.
func bucketConfigs(cfg Config) []jetstream.KeyValueConfig {
	kv := func(name, desc string, history uint8) jetstream.KeyValueConfig {
		return jetstream.KeyValueConfig{
			Bucket:      name,
			Description: desc,
			History:     history,
			Storage:     jetstream.FileStorage,
			Replicas:    cfg.Replicas,
			// Records are small JSON documents; a bigger one is a bug.
			MaxValueSize: 256 << 10,
		}
	}
	desired := kv(subjects.BucketDesired, "desired state of each device, key = device ID", 5)
	// A desired state carries its signed release, which grows with the
	// release's hosts: allow up to the message size limit.
	desired.MaxValueSize = int32(cfg.Limits.MaxPayload) - 4096
	desired.RePublish = &jetstream.RePublish{
		Source:      subjects.DesiredRepublishSource,
		Destination: subjects.DesiredRepublishDest,
		// A write's notification only: the coordinator sends a bare
		// trigger, the device reads its state.
		HeadersOnly: true,
	}
	locks := kv(subjects.BucketLocks, "leader locks (rollout engine)", 1)
	locks.TTL = engineLockTTL
	// A nonce must outlive its request's freshness window (time ± MaxSkew).
	nonces := kv(subjects.BucketNonces, "nonces of fresh admin requests", 1)
	nonces.TTL = 2*model.MaxSkew + time.Minute
	nonces.MaxValueSize = 64
	narinfo := kv(subjects.BucketNarInfo, "binary cache: narinfo per store path hash", 1)
	narinfo.MaxValueSize = model.MaxNarInfoBytes
	releases := kv(subjects.BucketReleases, "immutable signed release manifests", 1)
	releases.MaxValueSize = 4 << 20
	return []jetstream.KeyValueConfig{
		kv(subjects.BucketDevices, "device records", 5),
		desired,
		releases,
		kv(subjects.BucketRollouts, "rollout state, written by the engine leader", 5),
		kv(subjects.BucketTokens, "enrollment tokens, hashed", 1),
		kv(subjects.BucketAdmins, "admins and their roles", 5),
		kv(subjects.BucketEscrow, "sealed disk-encryption recovery keys", 10),
		kv(subjects.BucketPayloads, "sealed per-device payloads", 5),
		locks,
		nonces,
		kv(subjects.BucketRevocations, "revoked user keys (create only, never deleted)", 1),
		kv(subjects.BucketClaims, "the rollout that may drive each device", 1),
		kv(subjects.BucketGroups, "each group's target release", 5),
		narinfo,
	}
}

// streamConfigs are the streams of DESIGN §3 with their limits. disk is
// the bytes the state may use on this server (all replicas together).
func streamConfigs(cfg Config, disk int64) []jetstream.StreamConfig {
	share := func(pct int64) int64 {
		if disk <= 0 {
			return -1
		}
		// Each replica's bytes count against the account's limit.
		return disk / 100 * pct / int64(max(cfg.Replicas, 1))
	}
	return []jetstream.StreamConfig{
		{
			Name:              subjects.StreamFacts,
			Description:       "fact reports of every device",
			Subjects:          []string{subjects.AllFacts},
			Storage:           jetstream.FileStorage,
			Replicas:          cfg.Replicas,
			Retention:         jetstream.LimitsPolicy,
			Discard:           jetstream.DiscardOld,
			MaxAge:            cfg.FactsRetention,
			MaxMsgsPerSubject: cfg.FactsHistory,
			MaxMsgSize:        model.MaxFactsBytes,
			MaxBytes:          share(35),
			AllowDirect:       true,
		},
		{
			Name:              subjects.StreamEvents,
			Description:       "state transitions and apply results of every device",
			Subjects:          []string{subjects.AllEvents},
			Storage:           jetstream.FileStorage,
			Replicas:          cfg.Replicas,
			Retention:         jetstream.LimitsPolicy,
			Discard:           jetstream.DiscardOld,
			MaxAge:            cfg.EventsRetention,
			MaxMsgsPerSubject: 2000,
			MaxMsgSize:        model.MaxEventBytes,
			MaxBytes:          share(35),
			AllowDirect:       true,
		},
		{
			Name:        subjects.StreamAudit,
			Description: "signed admin requests and their results",
			Subjects:    []string{subjects.AllAudit},
			Storage:     jetstream.FileStorage,
			Replicas:    cfg.Replicas,
			Retention:   jetstream.LimitsPolicy,
			// The audit trail is append-only: nobody deletes or purges it.
			DenyDelete: true,
			DenyPurge:  true,
			MaxMsgSize: 1 << 20,
			// Full, it drops its oldest entries; the audit refuses to grow
			// from refusals (rate-limited, stored as hashes), and
			// fleet_jetstream_stream_bytes warns long before.
			MaxBytes:    share(15),
			AllowDirect: true,
		},
	}
}

// ensureStreams creates or updates every stream, bucket and object store; running it
// again with the same config changes nothing.
func ensureStreams(ctx context.Context, js jetstream.JetStream, cfg Config, disk int64) error {
	for _, a := range assets(js, cfg, disk) {
		if err := a.create(ctx); err != nil {
			return fmt.Errorf("%s: %w", a.name, err)
		}
	}
	return nil
}

// ensureClusterStreams creates or updates every stream, bucket and object
// store of a cluster, all at once, each retried (within perAsset a try)
// until it holds or ctx ends. Made one after another, each R3 asset of a
// cluster that has just formed took seconds, and together they took
// longer than any start should.
func ensureClusterStreams(ctx context.Context, js jetstream.JetStream, cfg Config, disk int64, perAsset time.Duration, wait func(error)) error {
	all := assets(js, cfg, disk)
	errs := make([]error, len(all))
	var wg sync.WaitGroup
	for i, a := range all {
		wg.Go(func() {
			err := retry(ctx, func() error {
				actx, cancel := context.WithTimeout(ctx, perAsset)
				defer cancel()
				if err := a.create(actx); err != nil {
					return err
				}
				return led(actx, js, a.stream)
			}, func(err error) { wait(fmt.Errorf("%s: %w", a.name, err)) })
			if err != nil {
				errs[i] = fmt.Errorf("%s: %w", a.name, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// retry runs step until it succeeds or ctx ends, a quarter second apart,
// telling waiting of each failure; it returns step's last error.
func retry(ctx context.Context, step func() error, waiting func(error)) error {
	for {
		err := step()
		if err == nil || ctx.Err() != nil {
			return err
		}
		waiting(err)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// led waits until the stream answers with a leader elected. A stream
// just created in a cluster that has just formed may have none yet, and
// then the lookups that come next (a bucket's stream info) time out.
func led(ctx context.Context, js jetstream.JetStream, stream string) error {
	for {
		// A stream without a leader does not answer at all: ask again
		// every two seconds rather than wait out the whole try.
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		s, err := js.Stream(rctx, stream)
		cancel()
		if err == nil {
			if ci := s.CachedInfo().Cluster; ci == nil || ci.Leader != "" {
				return nil
			}
			err = errors.New("no leader yet")
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("stream %s: %w", stream, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// asset is a stream, bucket or object store, the stream that holds it,
// and how to make it.
type asset struct {
	name   string
	stream string
	create func(context.Context) error
}

// assets are the coordinator's streams, buckets and object stores.
func assets(js jetstream.JetStream, cfg Config, disk int64) []asset {
	var out []asset
	for _, sc := range streamConfigs(cfg, disk) {
		out = append(out, asset{"stream " + sc.Name, sc.Name, func(ctx context.Context) error {
			_, err := js.CreateOrUpdateStream(ctx, sc)
			return err
		}})
	}
	for _, kc := range bucketConfigs(cfg) {
		out = append(out, asset{"bucket " + kc.Bucket, subjects.KVStream(kc.Bucket), func(ctx context.Context) error {
			_, err := js.CreateOrUpdateKeyValue(ctx, kc)
			return err
		}})
	}
	for _, oc := range objectStoreConfigs(cfg, disk) {
		out = append(out, asset{"object store " + oc.Bucket, subjects.ObjectStream(oc.Bucket), func(ctx context.Context) error {
			_, err := js.CreateOrUpdateObjectStore(ctx, oc)
			return err
		}})
	}
	return out
}

// objectStoreConfigs are the coordinator's object stores: the binary
// cache's NAR files, given what the streams leave of the state's disk
// (they reserve 85%): a full cache refuses pushes and nothing else. Raise
// --storage-gib for a bigger cache.
func objectStoreConfigs(cfg Config, disk int64) []jetstream.ObjectStoreConfig {
	maxBytes := int64(-1)
	if disk > 0 {
		maxBytes = disk / 100 * 15 / int64(max(cfg.Replicas, 1))
	}
	return []jetstream.ObjectStoreConfig{{
		Bucket: subjects.ObjectCache, Description: "binary cache: NAR files",
		Storage: jetstream.FileStorage, Replicas: cfg.Replicas, MaxBytes: maxBytes,
	}}
}
