package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"fleet/model"
	"fleet/subjects"
)

// The device index is the coordinator's in-memory picture of every device:
// its record, latest facts, last event and result, desired store path and
// when it was last seen. It is fed by exactly one consumer per stream and
// one watcher per bucket (DESIGN §3: nothing per device):
//
//   - FLEET_FACTS and FLEET_EVENTS: ordered consumers that start with
//     DeliverLastPerSubject, so a restarted coordinator rebuilds the latest
//     state of each device without replaying history, then follow new
//     messages;
//   - fleet_devices, fleet_desired and fleet_groups: one watcher over the
//     whole bucket;
//   - fleet_rollouts: one watcher on single-token keys (the summaries, not
//     the per-device <id>.<device> progress).
//
// Readers (the /metrics collector, the JSON API, Status) take a snapshot:
// each device's state is an immutable value replaced on every change (copy
// on write), so a snapshot copies pointers under a read lock and the ingest
// path waits at most for that copy, never for an HTTP client.

// factsInterval is how often an agent reports facts by default.
const factsInterval = model.FactsInterval

// onlineAfter is the fallback rule for online: last seen within three facts
// intervals. It applies only while no onlineSource is set.
const onlineAfter = 3 * factsInterval

// recentRollouts is how long a finished rollout stays in the metrics.
const recentRollouts = 24 * time.Hour

// onlineSource tells whether a device is connected (the server's
// connect/disconnect advisories; broker/presence.go).
type onlineSource interface {
	Online(id string) bool
}

// deviceState is one device's entry. It is never modified once published in
// the index: updates build a new value.
type deviceState struct {
	rec   *model.Device
	facts *model.Facts
	// event is the latest event; result the latest one that ended an apply.
	event  *model.Event
	result *model.Event
	// desired is the desired store path, rollout the rollout that wrote it,
	// release its release.
	desired, rollout, release string
	// desiredValue is the desired state as stored: what a rollout keeps
	// to revert to (model.RolloutDevice.Previous).
	desiredValue json.RawMessage
	lastSeen     time.Time
}

// lastResult is the device's latest apply result: from its events, or from
// its facts' LastApply when that is newer (events before the coordinator's
// restart are not replayed, facts carry the latest result).
func (s *deviceState) lastResult() (model.Result, string, time.Time) {
	var res model.Result
	var msg string
	var at time.Time
	if s.result != nil {
		res, msg, at = s.result.Result, s.result.Error, s.result.Time
	}
	if s.facts != nil && s.facts.LastApply != nil && s.facts.LastApply.Time.After(at) {
		la := s.facts.LastApply
		res, msg, at = la.Result, la.Error, la.Time
	}
	return res, msg, at
}

// indexStats count what the index has taken in, per source.
type indexStats struct {
	facts, events, records, desired, rollouts atomic.Uint64
	decodeErrors                              atomic.Uint64
}

type deviceIndex struct {
	log zerolog.Logger
	now func() time.Time

	mu       sync.RWMutex
	devs     map[string]*deviceState
	rollouts map[string]*model.Rollout
	targets  map[string]*model.GroupTarget
	// names counts the devices (not revoked) by name and by host name, for
	// telling a newcomer with a taken host name apart (named).
	names, hosts map[string]int
	online       onlineSource
	// changes counts what may change a device's convergence: records,
	// desired states, rollout summaries and group targets (the engine's
	// sweep looks again when it moved).
	changes atomic.Uint64

	stats indexStats

	// behind counts the sources (consumers and watchers) that have not yet
	// delivered what was there when they started; caughtUp is closed when
	// none is left, and only then does the coordinator say it is ready.
	behind   atomic.Int32
	caughtUp chan struct{}

	// How far the index has taken in fleet_devices and fleet_desired (see
	// devicesAsOf, desiredAsOf).
	devicesRev, desiredRev *revisions
}

// revisions is how far a watcher has taken in its bucket: the last
// revision applied, and a channel closed (and replaced) when it moves.
type revisions struct {
	mu    sync.Mutex
	at    uint64
	moved chan struct{}
}

func newRevisions() *revisions { return &revisions{moved: make(chan struct{})} }

// took records that everything up to revision rev is applied.
func (v *revisions) took(rev uint64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if rev > v.at {
		v.at = rev
		close(v.moved)
		v.moved = make(chan struct{})
	}
}

// reach waits until revision rev is applied.
func (v *revisions) reach(ctx context.Context, rev uint64) error {
	for {
		v.mu.Lock()
		at, moved := v.at, v.moved
		v.mu.Unlock()
		if at >= rev {
			return nil
		}
		select {
		case <-moved:
		case <-ctx.Done():
			return fmt.Errorf("index at revision %d of %d: %w", at, rev, ctx.Err())
		}
	}
}

func newDeviceIndex(log zerolog.Logger) *deviceIndex {
	return &deviceIndex{
		log:      log,
		now:      time.Now,
		devs:     map[string]*deviceState{},
		rollouts: map[string]*model.Rollout{},
		targets:  map[string]*model.GroupTarget{},
		names:    map[string]int{},
		hosts:    map[string]int{},
		caughtUp: make(chan struct{}),

		devicesRev: newRevisions(),
		desiredRev: newRevisions(),
	}
}

// sourceCaughtUp records that one source has delivered its initial
// values; it must be called once per source.
func (x *deviceIndex) sourceCaughtUp() {
	if x.behind.Add(-1) == 0 {
		close(x.caughtUp)
	}
}

// CaughtUp reports whether every source has delivered what it held when
// the index started.
func (x *deviceIndex) CaughtUp() bool {
	select {
	case <-x.caughtUp:
		return true
	default:
		return false
	}
}

// setOnline makes src the judge of online status.
func (x *deviceIndex) setOnline(src onlineSource) {
	x.mu.Lock()
	x.online = src
	x.mu.Unlock()
}

// update replaces device id's state with f applied to a copy of it. f
// returns false to drop the entry.
func (x *deviceIndex) update(id string, f func(s *deviceState) bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	var s deviceState
	var before *model.Device
	if old := x.devs[id]; old != nil {
		s = *old
		before = old.rec
	}
	if !f(&s) {
		delete(x.devs, id)
		x.countName(before, -1)
		return
	}
	x.devs[id] = &s
	if s.rec != before {
		x.countName(before, -1)
		x.countName(s.rec, 1)
	}
}

// countName adds n to rec's name and host name counts (x.mu held).
func (x *deviceIndex) countName(rec *model.Device, n int) {
	if rec == nil || rec.Status == model.DeviceRevoked {
		return
	}
	x.names[rec.Name] += n
	if x.names[rec.Name] <= 0 {
		delete(x.names, rec.Name)
	}
	x.hosts[rec.Host()] += n
	if x.hosts[rec.Host()] <= 0 {
		delete(x.hosts, rec.Host())
	}
}

func (x *deviceIndex) applyFacts(id string, data []byte, at time.Time) {
	var f model.Facts
	if err := json.Unmarshal(data, &f); err != nil {
		x.stats.decodeErrors.Add(1)
		x.log.Debug().Err(err).Str("device", id).Msg("undecodable facts")
		return
	}
	// The subject names the sender (its permissions allow only its own);
	// the payload's claim does not count.
	f.Device = id
	x.stats.facts.Add(1)
	x.update(id, func(s *deviceState) bool {
		// Stream order, not the device's clock, decides what is latest:
		// a clock set back must not freeze the device's entry.
		s.facts = &f
		if at.After(s.lastSeen) {
			s.lastSeen = at
		}
		return true
	})
}

func (x *deviceIndex) applyEvent(id string, data []byte, at time.Time) {
	var e model.Event
	if err := json.Unmarshal(data, &e); err != nil {
		x.stats.decodeErrors.Add(1)
		x.log.Debug().Err(err).Str("device", id).Msg("undecodable event")
		return
	}
	e.Device = id
	e.Log = "" // tails of logs are for `fleet-admin`, not the index
	x.stats.events.Add(1)
	x.update(id, func(s *deviceState) bool {
		s.event = &e
		if e.Result.Final() {
			s.result = &e
		}
		if at.After(s.lastSeen) {
			s.lastSeen = at
		}
		return true
	})
}

// applyRecord stores a device record; nil (deleted or purged) drops the
// device and everything known of it.
func (x *deviceIndex) applyRecord(id string, data []byte) {
	x.stats.records.Add(1)
	var d model.Device
	if data != nil {
		if err := json.Unmarshal(data, &d); err != nil {
			x.stats.decodeErrors.Add(1)
			x.log.Warn().Err(err).Str("device", id).Msg("undecodable device record")
			data = nil // as a read of the bucket would: no record
		}
	}
	if data == nil {
		// Gone, and all that was known of it but its desired state,
		// which stays in its bucket (and is what a rollout reverts to).
		x.update(id, func(s *deviceState) bool {
			*s = deviceState{desired: s.desired, rollout: s.rollout, release: s.release, desiredValue: s.desiredValue}
			return s.desiredValue != nil
		})
		x.changes.Add(1)
		return
	}
	d.ID = id
	x.update(id, func(s *deviceState) bool {
		s.rec = &d
		return true
	})
	x.changes.Add(1)
}

func (x *deviceIndex) applyDesired(id string, data []byte) {
	x.stats.desired.Add(1)
	// Only what the index keeps: decoding the signed release and deploy
	// statement too would be most of the work (and garbage) for each of a
	// rollout batch's writes.
	var d struct {
		StorePath string `json:"store_path"`
		RolloutID string `json:"rollout_id"`
		ReleaseID string `json:"release_id"`
	}
	if data != nil {
		if err := json.Unmarshal(data, &d); err != nil {
			x.stats.decodeErrors.Add(1)
			x.log.Warn().Err(err).Str("device", id).Msg("undecodable desired state")
			data = nil // as a read of the bucket would: none
			d.StorePath, d.RolloutID, d.ReleaseID = "", "", ""
		}
	}
	x.changes.Add(1)
	x.update(id, func(s *deviceState) bool {
		s.desired, s.rollout, s.release = d.StorePath, d.RolloutID, d.ReleaseID
		s.desiredValue = data
		// A device with nothing but a desired state (no record, never
		// seen) is not worth an entry.
		return s.rec != nil || s.facts != nil || s.event != nil || s.desired != ""
	})
}

func (x *deviceIndex) applyRollout(id string, data []byte) {
	x.stats.rollouts.Add(1)
	if data == nil {
		x.mu.Lock()
		delete(x.rollouts, id)
		x.mu.Unlock()
		return
	}
	var r model.Rollout
	if err := json.Unmarshal(data, &r); err != nil {
		x.stats.decodeErrors.Add(1)
		x.log.Warn().Err(err).Str("rollout", id).Msg("undecodable rollout")
		return
	}
	x.mu.Lock()
	x.rollouts[id] = &r
	x.mu.Unlock()
	x.changes.Add(1)
}

// applyTarget stores a group's target release (nil: it has none).
func (x *deviceIndex) applyTarget(group string, data []byte) {
	var t *model.GroupTarget
	if data != nil {
		t = new(model.GroupTarget)
		if err := json.Unmarshal(data, t); err != nil {
			x.stats.decodeErrors.Add(1)
			x.log.Warn().Err(err).Str("group", group).Msg("undecodable group target")
			return
		}
	}
	x.mu.Lock()
	if t == nil {
		delete(x.targets, group)
	} else {
		x.targets[group] = t
	}
	x.mu.Unlock()
	x.changes.Add(1)
}

// snapshot is a consistent, read-only view of the index.
type snapshot struct {
	at       time.Time
	devs     []*deviceState // sorted by ID
	rollouts []*model.Rollout
	targets  map[string]*model.GroupTarget
	// names counts the devices (not revoked) by name and by host name, for
	// telling a newcomer with a taken host name apart (named).
	names, hosts map[string]int
	online       onlineSource
}

func (x *deviceIndex) snapshot() *snapshot {
	x.mu.RLock()
	s := &snapshot{at: x.now(), online: x.online, devs: make([]*deviceState, 0, len(x.devs)), rollouts: make([]*model.Rollout, 0, len(x.rollouts))}
	for _, d := range x.devs {
		s.devs = append(s.devs, d)
	}
	for _, r := range x.rollouts {
		s.rollouts = append(s.rollouts, r)
	}
	s.targets = make(map[string]*model.GroupTarget, len(x.targets))
	for g, t := range x.targets {
		s.targets[g] = t
	}
	x.mu.RUnlock()
	sort.Slice(s.devs, func(i, j int) bool { return s.devs[i].id() < s.devs[j].id() })
	sort.Slice(s.rollouts, func(i, j int) bool { return s.rollouts[i].ID < s.rollouts[j].ID })
	return s
}

func (s *deviceState) id() string {
	switch {
	case s.rec != nil:
		return s.rec.ID
	case s.facts != nil:
		return s.facts.Device
	case s.event != nil:
		return s.event.Device
	}
	return ""
}

// exported reports whether the device has series and rows: it has a record
// and is not revoked. Facts of a device without a record (deleted, or not
// yet recorded) stay out, which bounds cardinality by the device bucket.
func (s *deviceState) exported() bool {
	return s.rec != nil && s.rec.Status != model.DeviceRevoked
}

// isOnline applies the online rule: the advisory source when set, else last
// seen within onlineAfter.
func (sn *snapshot) isOnline(s *deviceState) bool {
	if sn.online != nil {
		return sn.online.Online(s.rec.ID)
	}
	return !s.lastSeen.IsZero() && sn.at.Sub(s.lastSeen) <= onlineAfter
}

// row builds the status row of an exported device.
func (sn *snapshot) row(s *deviceState) model.DeviceStatusRow {
	r := model.DeviceStatusRow{
		ID: s.rec.ID, Name: s.rec.Name, Groups: s.rec.Groups, Status: s.rec.Status,
		Online: sn.isOnline(s), LastSeen: s.lastSeen,
		DesiredSystem: s.desired, Rollout: s.rollout, DesiredRelease: s.release,
	}
	if p := s.rec.Pin; p != nil {
		r.Pinned = p.ReleaseID
	} else if c := sn.conflict(s.rec); c != "" {
		r.Conflict = c
	}
	if f := s.facts; f != nil {
		r.CurrentSystem = f.CurrentSystem
		r.RebootNeeded = f.RebootNeeded
		for _, m := range f.Mounts {
			r.DiskMaxUsedRatio = max(r.DiskMaxUsedRatio, m.UsedRatio())
		}
		r.UpToDate = f.CurrentSystem != "" && (s.desired == "" || s.desired == f.CurrentSystem)
	}
	r.LastResult, r.LastError, _ = s.lastResult()
	return r
}

// rows returns the status rows of exported devices in group ("" = all).
func (sn *snapshot) rows(group string) []model.DeviceStatusRow {
	out := []model.DeviceStatusRow{}
	for _, s := range sn.devs {
		if !s.exported() || (group != "" && !slices.Contains(s.rec.Groups, group)) {
			continue
		}
		out = append(out, sn.row(s))
	}
	return out
}

// shownRollouts are the rollouts worth showing: unfinished ones and those
// finished within recentRollouts.
func (sn *snapshot) shownRollouts() []*model.Rollout {
	var out []*model.Rollout
	for _, r := range sn.rollouts {
		if !r.State.Finished() || sn.at.Sub(r.UpdatedAt) <= recentRollouts {
			out = append(out, r)
		}
	}
	return out
}

// run feeds the index until ctx ends. It returns once every consumer and
// watcher is created; errors after that are logged and retried by the
// library (ordered consumers recreate themselves, watchers resubscribe).
func (x *deviceIndex) run(ctx context.Context, js jetstream.JetStream) error {
	// Two streams and four buckets.
	x.behind.Store(6)
	for _, src := range []struct {
		stream, filter string
		apply          func(id string, data []byte, at time.Time)
	}{
		{subjects.StreamFacts, subjects.AllFacts, x.applyFacts},
		{subjects.StreamEvents, subjects.AllEvents, x.applyEvent},
	} {
		cons, err := js.OrderedConsumer(ctx, src.stream, jetstream.OrderedConsumerConfig{
			FilterSubjects: []string{src.filter},
			DeliverPolicy:  jetstream.DeliverLastPerSubjectPolicy,
			NamePrefix:     "fleet-index",
		})
		if err != nil {
			return err
		}
		apply := src.apply
		var once sync.Once
		caughtUp := func() { once.Do(x.sourceCaughtUp) }
		info, err := cons.Info(ctx)
		if err != nil {
			return err
		}
		if info.NumPending == 0 {
			caughtUp()
		}
		cc, err := cons.Consume(func(m jetstream.Msg) {
			at := time.Now()
			md, err := m.Metadata()
			if err == nil {
				at = md.Timestamp
			}
			if id, ok := subjects.DeviceFromSubject(m.Subject()); ok {
				apply(id, m.Data(), at)
			}
			if err == nil && md.NumPending == 0 {
				caughtUp()
			}
		})
		if err != nil {
			return err
		}
		go func() {
			<-ctx.Done()
			cc.Stop()
		}()
	}
	for _, w := range []struct {
		bucket, keys string
		apply        func(key string, data []byte)
		took         func(rev uint64)
	}{
		{subjects.BucketDevices, ">", x.applyRecord, x.devicesRev.took},
		{subjects.BucketDesired, ">", x.applyDesired, x.desiredRev.took},
		{subjects.BucketRollouts, "*", x.applyRollout, nil},
		{subjects.BucketGroups, ">", x.applyTarget, nil},
	} {
		kv, err := js.KeyValue(ctx, w.bucket)
		if err != nil {
			return err
		}
		kw, err := kv.Watch(ctx, w.keys)
		if err != nil {
			return err
		}
		go x.watch(ctx, kw, w.apply, w.took)
	}
	return nil
}

// watch applies a bucket's entries as they come, and then tells took (if
// any) their revision.
func (x *deviceIndex) watch(ctx context.Context, kw jetstream.KeyWatcher, apply func(string, []byte), took func(uint64)) {
	var once sync.Once
	followKV(ctx, kw, func(e jetstream.KeyValueEntry) {
		switch {
		case e == nil: // initial values delivered
			once.Do(x.sourceCaughtUp)
			return
		case e.Operation() != jetstream.KeyValuePut:
			apply(e.Key(), nil)
		default:
			apply(e.Key(), e.Value())
		}
		if took != nil {
			took(e.Revision())
		}
	})
}

// devicesAsOf returns every device record once the index has taken in
// fleet_devices up to revision seq (or later): what a read of the whole
// bucket would give then, without reading it.
func (x *deviceIndex) devicesAsOf(ctx context.Context, seq uint64) ([]model.Device, error) {
	if err := x.devicesRev.reach(ctx, seq); err != nil {
		return nil, err
	}
	x.mu.RLock()
	defer x.mu.RUnlock()
	out := make([]model.Device, 0, len(x.devs))
	for _, s := range x.devs {
		if s.rec != nil {
			out = append(out, *s.rec)
		}
	}
	return out, nil
}

// nameFor returns the name a new device with host name host is shown
// under: host itself, or, when a device (not revoked) already has that
// host name, the first of host-2, host-3, ... that no device has.
func (x *deviceIndex) nameFor(host string) string {
	x.mu.RLock()
	defer x.mu.RUnlock()
	if x.hosts[host] == 0 && x.names[host] == 0 {
		return host
	}
	for i := 2; ; i++ {
		if n := fmt.Sprintf("%s-%d", host, i); x.names[n] == 0 {
			return n
		}
	}
}

// rolloutOf returns rollout id's summary as the index has it.
func (x *deviceIndex) rolloutOf(id string) (*model.Rollout, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	r, ok := x.rollouts[id]
	return r, ok
}

// record returns device id's record (nil when the index has none). The
// value is never modified once in the index.
func (x *deviceIndex) record(id string) *model.Device {
	x.mu.RLock()
	defer x.mu.RUnlock()
	if s := x.devs[id]; s != nil {
		return s.rec
	}
	return nil
}

// latestFacts returns device id's latest facts (nil when none arrived). The
// value is never modified once in the index.
func (x *deviceIndex) latestFacts(id string) *model.Facts {
	x.mu.RLock()
	defer x.mu.RUnlock()
	if s := x.devs[id]; s != nil {
		return s.facts
	}
	return nil
}

// storedDesired is a device's desired state as stored, and what it names.
type storedDesired struct {
	ref   model.DesiredRef
	value json.RawMessage
}

// desiredAsOf returns every device's stored desired state once the index
// has taken in fleet_desired up to revision seq (or later).
func (x *deviceIndex) desiredAsOf(ctx context.Context, seq uint64) (map[string]storedDesired, error) {
	if err := x.desiredRev.reach(ctx, seq); err != nil {
		return nil, err
	}
	x.mu.RLock()
	defer x.mu.RUnlock()
	out := make(map[string]storedDesired, len(x.devs))
	for id, s := range x.devs {
		if s.desiredValue != nil {
			out[id] = storedDesired{ref: model.DesiredRef{ReleaseID: s.release, RolloutID: s.rollout, StorePath: s.desired}, value: s.desiredValue}
		}
	}
	return out, nil
}
