package broker

import (
	"context"
	"crypto/rand"
	"encoding/base32"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"fleet/model"
	"fleet/subjects"
)

// The rollout engine moves rollouts through their batches. One coordinator
// runs it at a time: the holder of the engine lock in fleet_locks. Rollout
// summaries may also be written by API handlers on any coordinator (pause,
// resume, abort), always with revision checks; the engine is the only writer
// of per-device progress. Everything it decides is persisted before it acts
// on the next step, so a coordinator killed at any point resumes where it was.

const (
	engineLockKey   = "rollout-engine"
	engineConsumer  = "rollout-engine"
	engineTick      = time.Second
	engineLockRenew = 5 * time.Second
	// engineLockTTL is fleet_locks' TTL: a lock not renewed for this long
	// is free for another coordinator.
	engineLockTTL      = 15 * time.Second
	desiredWriteWindow = 30 * time.Second
)

// rollouts is the engine and the rollout operations of the API.
type rollouts struct {
	log zerolog.Logger
	js  jetstream.JetStream
	// notify tells devices their desired state changed (the services);
	// set before Run.
	notify desiredNotifier
	name   string // this coordinator, as lock owner
	// leading is whether this coordinator drives rollouts now.
	leading  atomic.Bool
	rollouts jetstream.KeyValue
	desired  jetstream.KeyValue
	devices  jetstream.KeyValue
	releases jetstream.KeyValue
	claims   jetstream.KeyValue
	locks    jetstream.KeyValue
	// indexed are the streams of the buckets the engine reads from the
	// device index (see fromIndex), by bucket.
	indexed map[string]jetstream.Stream
	// claimStream is fleet_claims' stream, for its last sequence.
	claimStream jetstream.Stream

	// mu serialises the engine's own steps with event handling.
	mu sync.Mutex
	// cache holds the per-device progress of the rollouts the engine
	// drives, so a tick reads one summary per rollout, not every device.
	// The engine is the only writer of device progress; a summary revision
	// it did not write (an operator's pause, resume or abort, or another
	// rollout superseding devices) makes it read the devices again.
	cache map[string]*engineCache
	// active are the pending and running rollouts, kept by a watcher.
	active map[string]bool
	// kick asks the engine to step now rather than at its next tick: a
	// result arrived, a batch ended, a rollout appeared.
	kick chan struct{}
	// index is this coordinator's picture of the fleet: what devices run
	// (a deploy skips those already on its release) and what the
	// convergence sweep reads. Set before Run; nil in some tests.
	index  *deviceIndex
	groups jetstream.KeyValue
	// convergeKick asks the convergence sweep to run now.
	convergeKick chan struct{}
	// notDue remembers devices the sweep found not due (convergeLoop's
	// own).
	notDue map[string]notDue
}

type engineCache struct {
	rev  uint64
	devs []*model.RolloutDevice // batch order
	byID map[string]*model.RolloutDevice
	// claimsSeq is the sequence of the last claim the rollout took when
	// it was created here (0: not known): see batchClaims.
	claimsSeq uint64
}

func newRollouts(ctx context.Context, js jetstream.JetStream, name string, log zerolog.Logger) (*rollouts, error) {
	r := &rollouts{log: log, js: js, name: name, kick: make(chan struct{}, 1), convergeKick: make(chan struct{}, 1)}
	var err error
	for _, b := range []struct {
		kv   *jetstream.KeyValue
		name string
	}{
		{&r.rollouts, subjects.BucketRollouts},
		{&r.desired, subjects.BucketDesired},
		{&r.devices, subjects.BucketDevices},
		{&r.releases, subjects.BucketReleases},
		{&r.claims, subjects.BucketClaims},
		{&r.locks, subjects.BucketLocks},
		{&r.groups, subjects.BucketGroups},
	} {
		if *b.kv, err = js.KeyValue(ctx, b.name); err != nil {
			return nil, fmt.Errorf("bucket %s: %w", b.name, err)
		}
	}
	if r.claimStream, err = js.Stream(ctx, subjects.KVStream(subjects.BucketClaims)); err != nil {
		return nil, fmt.Errorf("bucket %s: %w", subjects.BucketClaims, err)
	}
	r.indexed = map[string]jetstream.Stream{}
	for _, b := range []string{subjects.BucketDevices, subjects.BucketDesired} {
		if r.indexed[b], err = js.Stream(ctx, subjects.KVStream(b)); err != nil {
			return nil, fmt.Errorf("bucket %s: %w", b, err)
		}
	}
	return r, nil
}

// newRolloutID returns an ID that sorts by creation time.
func newRolloutID(now time.Time) string {
	var b [5]byte
	_, _ = rand.Read(b[:])
	return "r" + now.UTC().Format("20060102-150405") + "-" + strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b[:]))
}

// deployPlan is what a deploy request resolves to before anything is
// written: the rollout to record and its devices, or the preview of it.
type deployPlan struct {
	ro      *model.Rollout
	devs    []*model.RolloutDevice
	taken   map[string][]*model.RolloutDevice
	preview model.DeployPreview
	phases  *zerolog.Event
}

// plan validates req and snapshots its target devices: the rollout a
// deploy would record. It writes nothing (deploy --dry-run shows it).
// Devices that already run the release and want it are left out; a plan
// with no devices left changes nothing.
func (r *rollouts) plan(ctx context.Context, req model.DeployRequest, by string, signed *model.Signed, preview bool) (*deployPlan, error) {
	strategy, err := model.ParseStrategy(req.Strategy)
	if err != nil {
		return nil, badRequest("%v", err)
	}
	spec := req.Batches
	if spec == "" {
		spec = model.DefaultBatches(strategy)
	} else if strategy == model.StrategyAll {
		return nil, badRequest("--batches does not go with --strategy all (one batch of every device)")
	}
	batches, err := model.ParseBatches(spec)
	if err != nil {
		return nil, badRequest("%v", err)
	}
	maxFail := model.Quantity{}
	if req.MaxFailures != "" {
		if maxFail, err = model.ParseQuantity(req.MaxFailures); err != nil {
			return nil, badRequest("--max-failures: %v", err)
		}
	}
	timeout := 5 * time.Minute
	if req.HealthTimeout != "" {
		if timeout, err = time.ParseDuration(req.HealthTimeout); err != nil || timeout <= 0 {
			return nil, badRequest("--health-timeout %q: want a positive duration like 5m", req.HealthTimeout)
		}
	}
	onFail, err := model.ParseOnFailure(req.OnFailure)
	if err != nil {
		return nil, badRequest("%v", err)
	}
	if (req.Group == "") == (len(req.Devices) == 0) {
		return nil, badRequest("name the target: --group G or --device ID (not both)")
	}
	var sample model.Quantity
	if req.Sample != "" {
		if sample, err = model.ParseQuantity(req.Sample); err != nil || sample.N == 0 && sample.Percent == 0 {
			return nil, badRequest("--sample %q: want a device count or a share like 5%%", req.Sample)
		}
	}

	began := time.Now()
	phases := zerolog.Dict()
	phase := func(name string) {
		phases.Dur(name, time.Since(began))
	}
	rel, _, err := r.release(ctx, req.ReleaseID)
	if err != nil {
		return nil, err
	}
	targets, err := r.targets(ctx, req)
	phase("targets")
	if err != nil {
		return nil, err
	}
	now := time.Now().UTC()
	ro := &model.Rollout{
		ID: newRolloutID(now), ReleaseID: rel.ID, CreatedAt: now, UpdatedAt: now, CreatedBy: by, Request: signed,
		Group: req.Group, Strategy: strategy, Batches: batches, MaxFailures: maxFail,
		HealthTimeout: model.Duration(timeout), OnFailure: onFail, State: model.RolloutPending,
		Counts: map[model.DeviceRolloutState]int{},
		// A rollout over the whole group sets its target when it succeeds;
		// a sampled cohort is a canary and sets nothing.
		SetsTarget: req.Group != "" && req.Sample == "",
	}
	p := &deployPlan{ro: ro, phases: phases}
	pv := &p.preview
	pv.ReleaseID, pv.Group, pv.Batches = rel.ID, req.Group, batches
	// Each device's current desired state is what a revert returns to.
	previous, err := r.currentDesired(ctx)
	if err != nil {
		return nil, err
	}
	phase("previous")
	var sn *snapshot
	if r.index != nil {
		sn = r.index.snapshot()
	}
	var devs []*model.RolloutDevice
	for _, d := range targets {
		st := sn.state(d.ID)
		pd := st.preview(sn, d)
		path, ok := rel.PathFor(d.Host())
		switch {
		case !ok:
			ro.Skipped = append(ro.Skipped, d.Name)
			pd.Reason = "the release has no closure for host " + d.Name
			pv.Skipped = append(pv.Skipped, pd)
			continue
		case d.Pin != nil && req.Group != "":
			pd.Reason = "pinned to " + d.Pin.ReleaseID + " (fleet-admin devices unpin)"
			pv.Skipped = append(pv.Skipped, pd)
			continue
		}
		pd.New = path
		if prev, ok := previous[d.ID]; ok && prev.ref.ReleaseID == rel.ID && prev.ref.StorePath == path && pd.Current == path {
			pd.Reason = "already runs " + rel.ID
			pv.Unchanged = append(pv.Unchanged, pd)
			continue
		}
		devs = append(devs, &model.RolloutDevice{Device: d.ID, Name: d.Name, State: model.DeviceQueued, StorePath: path, Previous: previous[d.ID].value})
		pv.Devices = append(pv.Devices, pd)
	}
	if len(devs) == 0 && len(pv.Unchanged) == 0 {
		why := "release " + rel.ID + " names no closure for any target device"
		if len(ro.Skipped) < len(pv.Skipped) {
			why = "no target device can take release " + rel.ID
		}
		reasons := make([]string, len(pv.Skipped))
		for i, d := range pv.Skipped {
			reasons[i] = d.Name + ": " + d.Reason
		}
		return nil, badRequest("%s (%s)", why, strings.Join(reasons, "; "))
	}
	if req.Sample != "" {
		ro.Sample, ro.Seed = req.Sample, req.Seed
		if ro.Seed == 0 {
			ro.Seed = randomSeed()
		}
		devs, pv.Devices = drawSample(devs, pv.Devices, sample, ro.Seed)
		pv.Sample, pv.Seed = ro.Sample, ro.Seed
	}
	if err := checkBatchesGrow(spec, batches, len(devs)); err != nil {
		return nil, err
	}
	ro.BatchSizes = model.BatchSizes(batches, len(devs))
	pv.BatchSizes = ro.BatchSizes
	i := 0
	for b, n := range ro.BatchSizes {
		for range n {
			devs[i].Batch, pv.Devices[i].Batch = b, b
			i++
		}
	}
	p.devs = devs
	if len(devs) == 0 {
		return p, nil
	}
	p.taken, err = r.busy(ctx, devs, req.Supersede || preview)
	if err != nil {
		return nil, err
	}
	for _, ds := range p.taken {
		for _, d := range ds {
			pv.Busy = append(pv.Busy, d.Name)
		}
	}
	slices.Sort(pv.Busy)
	phase("busy")
	ro.Total = len(devs)
	groups := map[string]bool{}
	for _, d := range targets {
		for _, g := range d.Groups {
			groups[g] = true
		}
	}
	for g := range groups {
		ro.Groups = append(ro.Groups, g)
	}
	slices.Sort(ro.Groups)
	ro.Counts[model.DeviceQueued] = len(devs)
	return p, nil
}

// Preview is what Create would do with req, written nowhere.
func (r *rollouts) Preview(ctx context.Context, req model.DeployRequest) (*model.DeployPreview, error) {
	p, err := r.plan(ctx, req, "", nil, true)
	if err != nil {
		return nil, err
	}
	return &p.preview, nil
}

// Create validates req, snapshots the target devices and records a pending
// rollout for the engine to start. When every target already runs the
// release, it records nothing and says so (Rollout nil).
func (r *rollouts) Create(ctx context.Context, req model.DeployRequest, by string, signed *model.Signed) (*model.DeployResult, error) {
	p, err := r.plan(ctx, req, by, signed, false)
	if err != nil {
		return nil, err
	}
	if len(p.devs) == 0 {
		return &model.DeployResult{Unchanged: len(p.preview.Unchanged)}, nil
	}
	if err := r.record(ctx, p.ro, p.devs, p.taken, p.phases); err != nil {
		return nil, err
	}
	return &model.DeployResult{Rollout: p.ro, Unchanged: len(p.preview.Unchanged)}, nil
}

// record claims a planned rollout's devices and writes it: device records
// first, the summary last, so the engine only sees a rollout once all of
// it is there.
func (r *rollouts) record(ctx context.Context, ro *model.Rollout, devs []*model.RolloutDevice, taken map[string][]*model.RolloutDevice, phases *zerolog.Event) error {
	began := time.Now()
	// The device records are written while the claims are taken, from
	// the moment the first is (the deploy that loses a race for the same
	// devices stops there, having written nothing): nothing reads a
	// rollout's records before its summary, written last, is there, and
	// a deploy refused a later claim takes its records back.
	var put chan error
	// busy() looked; claiming decides: of two deploys racing for a device
	// (on two coordinators), one gets it and the other is refused.
	undo, claimsSeq, err := r.claim(ctx, ro.ID, devs, taken, func() {
		put = make(chan error, 1)
		go func() { put <- r.putDevices(ctx, ro.ID, devs) }()
	})
	phases.Dur("claims", time.Since(began))
	var perr error
	if put != nil {
		perr = <-put
	}
	if err != nil || perr != nil {
		if err == nil {
			undo()
			err = perr
		}
		if put != nil {
			r.purgeRecords(ctx, ro.ID, devs)
		}
		return err
	}
	created := false
	defer func() {
		if !created {
			undo()
		}
	}()
	b, _ := json.Marshal(ro)
	// A leading engine starts from what was just written rather than a
	// read of every device record: its cache is filled before the engine
	// can see the summary (its watch delivers it at once, and a step
	// waits for r.mu).
	cache := newEngineCache(devs)
	cache.claimsSeq = claimsSeq
	r.mu.Lock()
	rev, err := r.rollouts.Create(ctx, ro.ID, b)
	if err == nil && r.active != nil && r.cache[ro.ID] == nil {
		cache.rev = rev
		r.cache[ro.ID] = cache
	}
	r.mu.Unlock()
	if err != nil {
		// Leave nothing half-written: the device records go too.
		r.purgeRecords(ctx, ro.ID, devs)
		return fmt.Errorf("record rollout: %w", err)
	}
	created = true
	phases.Dur("recorded", time.Since(began))
	if err := r.settle(ctx, taken, model.DeviceSuperseded, "superseded by rollout "+ro.ID); err != nil {
		return err
	}
	r.log.Info().Str("rollout", ro.ID).Str("kind", ro.Kind).Int("devices", ro.Total).Dict("after", phases).Msg("rollout created")
	// When this coordinator leads the engine, start now rather than when
	// the summary's watch delivers it.
	r.follow(ro.ID, ro)
	return nil
}

// purgeRecords takes back the device records of a rollout that was not
// created, in bulk (each a KV purge), even when the request that asked
// for it has gone.
func (r *rollouts) purgeRecords(ctx context.Context, rollout string, devs []*model.RolloutDevice) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), desiredWriteWindow)
	defer cancel()
	msgs := make([]bulkMsg, len(devs))
	for i, d := range devs {
		msgs[i] = bulkMsg{subj: subjects.KVKey(subjects.BucketRollouts, deviceKey(rollout, d.Device)), header: kvPurgeHeader}
	}
	_, errs := publishBulk(ctx, r.js, msgs)
	if err := firstError(errs, func(i int) string { return "take back rollout " + rollout + " device " + devs[i].Device }); err != nil {
		r.log.Warn().Err(err).Str("rollout", rollout).Msg("device records of a rollout that was not created are left behind")
	}
}

// kvPurgeHeader makes a message a KV purge of its key (as the KV API's
// Purge writes it): the key's earlier values go, a marker stays.
var kvPurgeHeader = nats.Header{"KV-Operation": []string{"PURGE"}, "Nats-Rollup": []string{"sub"}}

// newEngineCache is the engine's copy of a rollout's device records, as
// Devices would read them back (its rev still to be set).
func newEngineCache(devs []*model.RolloutDevice) *engineCache {
	c := &engineCache{devs: make([]*model.RolloutDevice, len(devs)), byID: make(map[string]*model.RolloutDevice, len(devs))}
	for i, d := range devs {
		cp := *d
		c.devs[i] = &cp
		c.byID[d.Device] = &cp
	}
	slices.SortFunc(c.devs, byBatchAndName)
	return c
}

// byBatchAndName is the order of a rollout's devices.
func byBatchAndName(a, b *model.RolloutDevice) int {
	if a.Batch != b.Batch {
		return a.Batch - b.Batch
	}
	return strings.Compare(a.Name, b.Name)
}

func randomSeed() uint64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return binary.LittleEndian.Uint64(b[:]) | 1
}

// checkBatchesGrow refuses batches that, resolved against n devices,
// shrink ("10%,1" of 50 devices is 5 then 1): entries are cumulative.
func checkBatchesGrow(spec string, batches []model.Quantity, n int) error {
	for i := 1; i < len(batches); i++ {
		prev, cur := batches[i-1].Of(n), batches[i].Of(n)
		if cur < prev {
			return badRequest("--batches %q: batch %d reaches %d device(s) (%s), fewer than batch %d before it (%s = %d); entries are cumulative and must grow",
				spec, i+1, cur, batches[i], i, batches[i-1], prev)
		}
	}
	return nil
}

// drawSample keeps a random cohort of q devices (at least one), drawn
// with seed: the same seed over the same devices draws the same cohort.
// The order (by name) is kept.
func drawSample(devs []*model.RolloutDevice, pd []model.PreviewDevice, q model.Quantity, seed uint64) ([]*model.RolloutDevice, []model.PreviewDevice) {
	n := max(q.Of(len(devs)), 1)
	idx := make([]int, len(devs))
	for i := range idx {
		idx[i] = i
	}
	rng := mrand.New(mrand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	rng.Shuffle(len(idx), func(i, j int) { idx[i], idx[j] = idx[j], idx[i] })
	idx = idx[:n]
	slices.Sort(idx)
	outD := make([]*model.RolloutDevice, n)
	outP := make([]model.PreviewDevice, n)
	for i, k := range idx {
		outD[i], outP[i] = devs[k], pd[k]
	}
	return outD, outP
}

// release loads and verifies a recorded release.
func (r *rollouts) release(ctx context.Context, id string) (*model.Release, *model.Signed, error) {
	if err := model.CheckReleaseID(id); err != nil {
		return nil, nil, badRequest("%v", err)
	}
	e, err := r.releases.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, nil, notFound("release %q does not exist (see fleet-admin release ls)", id)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read release %s: %w", id, err)
	}
	var s model.Signed
	if err := json.Unmarshal(e.Value(), &s); err != nil {
		return nil, nil, fmt.Errorf("release %s is damaged: %w", id, err)
	}
	rel, err := model.VerifyRelease(&s, nil)
	if err != nil {
		return nil, nil, err
	}
	return rel, &s, nil
}

// targets resolves the request's devices: active ones only, sorted by name
// so batches are predictable.
func (r *rollouts) targets(ctx context.Context, req model.DeployRequest) ([]model.Device, error) {
	var out []model.Device
	if req.Group != "" {
		all, err := r.currentDevices(ctx)
		if err != nil {
			return nil, err
		}
		for _, d := range all {
			if d.Status == model.DeviceActive && slices.Contains(d.Groups, req.Group) {
				out = append(out, d)
			}
		}
		if len(out) == 0 {
			return nil, badRequest("group %q has no active devices (see fleet-admin devices ls --group %s)", req.Group, req.Group)
		}
	} else {
		for _, id := range req.Devices {
			e, err := r.devices.Get(ctx, id)
			if err != nil {
				return nil, notFound("device %s: not found", id)
			}
			var d model.Device
			if err := json.Unmarshal(e.Value(), &d); err != nil {
				return nil, fmt.Errorf("device %s: damaged record: %w", id, err)
			}
			if d.Status != model.DeviceActive {
				return nil, conflict("device %s (%s) is %s, not active", d.Name, id, d.Status)
			}
			if d.Pin != nil && d.Pin.ReleaseID != req.ReleaseID {
				return nil, conflict("device %s (%s) is pinned to %s: unpin it first (fleet-admin devices unpin %s)", d.Name, id, d.Pin.ReleaseID, d.Name)
			}
			out = append(out, d)
		}
	}
	slices.SortFunc(out, func(a, b model.Device) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// indexWait bounds how long a read of the fleet's records waits for the
// device index to take in the bucket's latest writes (a few milliseconds
// behind at most, unless something is wrong) before it reads the bucket
// itself.
const indexWait = time.Second

// currentDevices is every device record as fleet_devices holds it now:
// from the device index once it has taken in the bucket's last revision,
// else read from the bucket (a whole fleet's records, each decoded).
func (r *rollouts) currentDevices(ctx context.Context) ([]model.Device, error) {
	var devs []model.Device
	if r.fromIndex(ctx, subjects.BucketDevices, func(ctx context.Context, rev uint64) (err error) {
		devs, err = r.index.devicesAsOf(ctx, rev)
		return err
	}) {
		return devs, nil
	}
	return readDevices(ctx, r.devices)
}

// fromIndex calls read with bucket's last revision, for the device index
// to answer once it has taken that in, within indexWait; false when there
// is no index, or it lags (the caller reads the bucket then).
func (r *rollouts) fromIndex(ctx context.Context, bucket string, read func(ctx context.Context, rev uint64) error) bool {
	if r.index == nil {
		return false
	}
	rev, err := r.lastRevision(ctx, bucket)
	if err != nil {
		return false
	}
	wctx, cancel := context.WithTimeout(ctx, indexWait)
	defer cancel()
	if err := read(wctx, rev); err != nil {
		r.log.Warn().Err(err).Str("bucket", bucket).Msg("the device index is behind its bucket: reading the bucket")
		return false
	}
	return true
}

// lastRevision is the revision of the last entry bucket holds (a delete
// or purge marker included; 0: none). Not the stream's last sequence:
// that stays where it was when its last message is removed (a compaction
// of delete markers), and a watcher started since never sees it.
func (r *rollouts) lastRevision(ctx context.Context, bucket string) (uint64, error) {
	st := r.indexed[bucket]
	if st == nil {
		return 0, fmt.Errorf("bucket %s is not read from the device index", bucket)
	}
	m, err := st.GetLastMsgForSubject(ctx, subjects.KVKey(bucket, ">"))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return m.Sequence, nil
}

// currentDesired is every device's desired state as fleet_desired holds it
// now, kept as stored and read for what it names only (see
// model.RolloutDevice.Previous): from the device index once it has taken
// in the bucket's last revision, else read from the bucket.
func (r *rollouts) currentDesired(ctx context.Context) (map[string]storedDesired, error) {
	var out map[string]storedDesired
	if r.fromIndex(ctx, subjects.BucketDesired, func(ctx context.Context, rev uint64) (err error) {
		out, err = r.index.desiredAsOf(ctx, rev)
		return err
	}) {
		return out, nil
	}
	out = map[string]storedDesired{}
	err := eachKey(ctx, r.desired, func(e jetstream.KeyValueEntry) {
		var p storedDesired
		if json.Unmarshal(e.Value(), &p.ref) == nil {
			p.value = e.Value()
			out[e.Key()] = p
		}
	})
	return out, err
}

// claim takes each device for rollout id in fleet_claims: with Create, or
// over a claim whose rollout has finished or that this deploy supersedes
// (taken), with a revision check. Any other claim is a conflict, and the
// claims taken so far are given back. first (if any) is called once the
// first claim is taken. It returns how to give them back, and the
// sequence of the last claim it wrote (0 when its claims took too long
// for that to be of use: see batchClaims).
func (r *rollouts) claim(ctx context.Context, id string, devs []*model.RolloutDevice, taken map[string][]*model.RolloutDevice, first func()) (undo func(), last uint64, err error) {
	type held struct {
		dev string
		rev uint64
	}
	var got []held
	undo = func() {
		uctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for _, h := range got {
			_ = r.claims.Delete(uctx, h.dev, jetstream.LastRevision(h.rev))
		}
	}
	superseded := map[string]bool{}
	for owner, ds := range taken {
		for _, d := range ds {
			superseded[owner+"/"+d.Device] = true
		}
	}
	finished := map[string]bool{}
	// claimAll claims ds, or gives back every claim taken so far.
	claimAll := func(ds []*model.RolloutDevice) error {
		// Most devices have no claim yet: create those in bulk (a windowed
		// publish that expects no earlier message on the key), and take the
		// one-by-one path below only for the devices that had one.
		msgs := make([]bulkMsg, len(ds))
		for i, d := range ds {
			msgs[i] = bulkMsg{subj: subjects.KVKey(subjects.BucketClaims, d.Device), data: []byte(id),
				opts: []jetstream.PublishOpt{jetstream.WithExpectLastSequencePerSubject(0)}}
		}
		acks, errs := publishBulk(ctx, r.js, msgs)
		var rest []*model.RolloutDevice
		for i, d := range ds {
			switch {
			case errs[i] == nil:
				got = append(got, held{d.Device, acks[i].Sequence})
			case isWrongRevision(errs[i]):
				rest = append(rest, d)
			default:
				undo()
				return fmt.Errorf("claim %s: %w", d.Name, errs[i])
			}
		}
		if len(rest) == 0 {
			return nil
		}
		// The devices claimed before (by a rollout since finished, most
		// often: every deploy after a fleet's first): their claims read,
		// all at once for many, and taken over in bulk, each write
		// expecting the revision read.
		// A claim given back (a deploy that failed, a rollout deleted)
		// leaves a delete marker: the key is free, and the write expects
		// the marker's revision.
		prior := map[string]jetstream.KeyValueEntry{}
		if len(rest) > claimScanFrom {
			if err := eachEntry(ctx, r.claims, func(e jetstream.KeyValueEntry) { prior[e.Key()] = e }); err != nil {
				undo()
				return err
			}
		} else {
			for _, d := range rest {
				e, err := r.claims.Get(ctx, d.Device)
				if errors.Is(err, jetstream.ErrKeyNotFound) {
					// Deleted: nats.go's Get does not say at which
					// revision; the last message on the key does.
					e, err = lastEntry(ctx, r.claims, d.Device)
				}
				if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
					undo()
					return fmt.Errorf("claim %s: %w", d.Name, err)
				}
				if err == nil {
					prior[d.Device] = e
				}
			}
		}
		msgs = msgs[:0]
		for _, d := range rest {
			e := prior[d.Device]
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				var last uint64
				if e != nil {
					last = e.Revision()
				}
				msgs = append(msgs, bulkMsg{subj: subjects.KVKey(subjects.BucketClaims, d.Device), data: []byte(id),
					opts: []jetstream.PublishOpt{jetstream.WithExpectLastSequencePerSubject(last)}})
				continue
			}
			owner := string(e.Value())
			free, ok := finished[owner]
			if !ok {
				ro, _, err := r.Get(ctx, owner)
				var ae *apiError
				free = err == nil && ro.State.Finished()
				// A claim without its rollout is one being created right
				// now (its summary comes last), or left by a deploy that
				// died midway: free only once it is clearly the latter.
				if errors.As(err, &ae) && ae.code == model.CodeNotFound && time.Since(e.Created()) > orphanClaimAge {
					free = true
				}
				finished[owner] = free
			}
			if !free && !superseded[owner+"/"+d.Device] {
				undo()
				return conflict("device %s is claimed by unfinished rollout %s: wait for it, abort it, or pass --supersede", d.Name, owner)
			}
			msgs = append(msgs, bulkMsg{subj: subjects.KVKey(subjects.BucketClaims, d.Device), data: []byte(id),
				opts: []jetstream.PublishOpt{jetstream.WithExpectLastSequencePerSubject(e.Revision())}})
		}
		acks, errs = publishBulk(ctx, r.js, msgs)
		var lost error
		for i, d := range rest {
			switch {
			case errs[i] == nil:
				got = append(got, held{d.Device, acks[i].Sequence})
			case lost != nil:
			case isWrongRevision(errs[i]):
				lost = conflict("device %s was claimed by another rollout a moment ago: deploy again", d.Name)
			default:
				lost = fmt.Errorf("claim %s: %w", d.Name, errs[i])
			}
		}
		if lost != nil {
			undo()
			return lost
		}
		return nil
	}
	// One device first, alone, the lowest ID: of two deploys racing for
	// the same devices, the one that takes it takes the rest, and the
	// other stops there holding nothing (claimed in bulk together, each
	// could take some and both be refused).
	if len(devs) > 0 {
		lowest := slices.MinFunc(devs, func(a, b *model.RolloutDevice) int { return strings.Compare(a.Device, b.Device) })
		rest := make([]*model.RolloutDevice, 0, len(devs)-1)
		for _, d := range devs {
			if d != lowest {
				rest = append(rest, d)
			}
		}
		if err := claimAll([]*model.RolloutDevice{lowest}); err != nil {
			return nil, 0, err
		}
		firstAt := time.Now()
		if first != nil {
			first()
		}
		if err := claimAll(rest); err != nil {
			return nil, 0, err
		}
		if time.Since(firstAt) > orphanClaimAge/4 {
			// Long enough that another deploy could have taken one of
			// these claims as an orphan's (orphanClaimAge, by another
			// coordinator's clock) while the rest were written.
			return undo, 0, nil
		}
	}
	for _, h := range got {
		last = max(last, h.rev)
	}
	return undo, last, nil
}

// claimScanFrom is how many claimed devices a deploy reads all claims for
// in one pass rather than one at a time.
const claimScanFrom = 32

// orphanClaimAge is how old a claim whose rollout does not exist must be
// before another rollout may take it: far longer than a deploy takes to
// record its rollout.
const orphanClaimAge = 2 * time.Minute

// batchClaims is the claims a batch starts from: device ID → rollout ID.
// When nothing was written to fleet_claims since the rollout took its
// devices' claims here (the stream's last sequence, as its leader says,
// is still that of its last claim), no deploy has taken one since and
// none was given back: they are all still the rollout's, and the bucket
// is not read. Claims written between two of its own were of other
// devices: one of its devices can be taken only through its summary,
// written after all its claims, or as an orphan's claim, which takes
// orphanClaimAge (claim gives no sequence when its claims took a quarter
// of that; a clock two minutes off would still slip through). Else, and
// when the rollout was created elsewhere, every claim is read.
func (r *rollouts) batchClaims(ctx context.Context, rollout string, c *engineCache, devs []*model.RolloutDevice) (map[string]string, error) {
	if c != nil && c.claimsSeq != 0 {
		// Stream info, not a direct get: any replica answers those, and
		// one that lags could hold exactly the rollout's last claim.
		info, err := r.claimStream.Info(ctx)
		if err == nil && info.State.LastSeq == c.claimsSeq {
			out := make(map[string]string, len(devs))
			for _, d := range devs {
				out[d.Device] = rollout
			}
			return out, nil
		}
	}
	return r.claimsOf(ctx)
}

// claimsOf reads every device's claim: device ID → rollout ID.
func (r *rollouts) claimsOf(ctx context.Context) (map[string]string, error) {
	out := map[string]string{}
	err := eachKey(ctx, r.claims, func(e jetstream.KeyValueEntry) { out[e.Key()] = string(e.Value()) })
	return out, err
}

// busy finds the target devices that are still queued or waiting in other
// unfinished rollouts. Without supersede that is a conflict; with it they
// are returned, per rollout, to be marked superseded once the new rollout
// is recorded.
func (r *rollouts) busy(ctx context.Context, devs []*model.RolloutDevice, supersede bool) (map[string][]*model.RolloutDevice, error) {
	active, err := r.List(ctx)
	if err != nil {
		return nil, err
	}
	want := map[string]bool{}
	for _, d := range devs {
		want[d.Device] = true
	}
	taken := map[string][]*model.RolloutDevice{}
	for _, ro := range active {
		if ro.State.Finished() {
			continue
		}
		rdevs, err := r.Devices(ctx, ro)
		if err != nil {
			return nil, err
		}
		for _, d := range rdevs {
			// Failed devices count too: resuming their rollout retries them.
			if !want[d.Device] || d.State.Done() && !d.State.Failed() {
				continue
			}
			if !supersede {
				return nil, conflict("device %s is already in unfinished rollout %s (%s): wait for it, abort it, or pass --supersede", d.Name, ro.ID, ro.State)
			}
			taken[ro.ID] = append(taken[ro.ID], d)
		}
	}
	return taken, nil
}

// settle takes devices out of their unfinished rollouts (state and why) and
// touches those summaries, so the engine reads their devices again.
func (r *rollouts) settle(ctx context.Context, taken map[string][]*model.RolloutDevice, state model.DeviceRolloutState, why string) error {
	now := time.Now().UTC()
	for id, devs := range taken {
		for _, d := range devs {
			d.State, d.Error, d.Finished = state, why, now
			if err := r.putDevice(ctx, id, d); err != nil {
				return err
			}
		}
		for {
			ro, rev, err := r.Get(ctx, id)
			if err != nil {
				return err
			}
			ro.UpdatedAt = now
			b, _ := json.Marshal(ro)
			if _, err := r.rollouts.Update(ctx, id, b, rev); err == nil {
				break
			} else if !isWrongRevision(err) {
				return fmt.Errorf("update rollout %s: %w", id, err)
			}
		}
	}
	return nil
}

// DeviceGone takes a revoked device out of every unfinished rollout that
// still waits for it or would retry it.
func (r *rollouts) DeviceGone(ctx context.Context, id, why string) error {
	taken, err := r.busy(ctx, []*model.RolloutDevice{{Device: id}}, true)
	if err != nil {
		return err
	}
	return r.settle(ctx, taken, model.DeviceSkipped, why)
}

// List returns every rollout summary, oldest first.
func (r *rollouts) List(ctx context.Context) ([]*model.Rollout, error) {
	lister, err := r.rollouts.ListKeysFiltered(ctx, "*")
	if err != nil {
		if errors.Is(err, jetstream.ErrNoKeysFound) {
			return nil, nil
		}
		return nil, fmt.Errorf("list rollouts: %w", err)
	}
	var out []*model.Rollout
	for k := range lister.Keys() {
		ro, _, err := r.Get(ctx, k)
		if err == nil {
			out = append(out, ro)
		}
	}
	slices.SortFunc(out, func(a, b *model.Rollout) int { return a.CreatedAt.Compare(b.CreatedAt) })
	return out, nil
}

// Get reads a rollout summary and its revision.
func (r *rollouts) Get(ctx context.Context, id string) (*model.Rollout, uint64, error) {
	if err := model.CheckRolloutID(id); err != nil {
		return nil, 0, badRequest("%v", err)
	}
	e, err := r.rollouts.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, notFound("rollout %q does not exist (see fleet-admin rollout ls)", id)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("read rollout %s: %w", id, err)
	}
	var ro model.Rollout
	if err := json.Unmarshal(e.Value(), &ro); err != nil {
		return nil, 0, fmt.Errorf("rollout %s is damaged: %w", id, err)
	}
	return &ro, e.Revision(), nil
}

// Devices returns a rollout's per-device progress in batch order (then by
// name), read in one pass over its <id>.<device> keys.
func (r *rollouts) Devices(ctx context.Context, ro *model.Rollout) ([]*model.RolloutDevice, error) {
	w, err := r.rollouts.WatchFiltered(ctx, []string{ro.ID + ".*"}, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("read rollout %s devices: %w", ro.ID, err)
	}
	defer func() { _ = w.Stop() }()
	out := make([]*model.RolloutDevice, 0, ro.Total)
	for done := false; !done; {
		select {
		case e, ok := <-w.Updates():
			switch {
			case !ok:
				return nil, fmt.Errorf("read rollout %s devices: watch ended", ro.ID)
			case e == nil:
				done = true
			default:
				var d model.RolloutDevice
				if err := json.Unmarshal(e.Value(), &d); err != nil {
					return nil, fmt.Errorf("rollout %s device %s is damaged: %w", ro.ID, e.Key(), err)
				}
				out = append(out, &d)
			}
		case <-ctx.Done():
			return nil, fmt.Errorf("read rollout %s devices: %w", ro.ID, ctx.Err())
		}
	}
	if len(out) != ro.Total {
		return nil, fmt.Errorf("rollout %s: %d of its %d device records found", ro.ID, len(out), ro.Total)
	}
	slices.SortFunc(out, byBatchAndName)
	return out, nil
}

func deviceKey(rollout, dev string) string { return rollout + "." + dev }

func (r *rollouts) getDevice(ctx context.Context, rollout, dev string) (*model.RolloutDevice, error) {
	e, err := r.rollouts.Get(ctx, deviceKey(rollout, dev))
	if err != nil {
		return nil, fmt.Errorf("rollout %s device %s: %w", rollout, dev, err)
	}
	var d model.RolloutDevice
	if err := json.Unmarshal(e.Value(), &d); err != nil {
		return nil, fmt.Errorf("rollout %s device %s is damaged: %w", rollout, dev, err)
	}
	return &d, nil
}

// putDevices records many devices' progress with windowed async
// publishes: a round trip per window instead of one per device.
func (r *rollouts) putDevices(ctx context.Context, rollout string, devs []*model.RolloutDevice) error {
	ctx, cancel := context.WithTimeout(ctx, desiredWriteWindow)
	defer cancel()
	msgs := make([]bulkMsg, len(devs))
	for i, d := range devs {
		b, _ := json.Marshal(d)
		msgs[i] = bulkMsg{subj: subjects.KVKey(subjects.BucketRollouts, deviceKey(rollout, d.Device)), data: b}
	}
	_, errs := publishBulk(ctx, r.js, msgs)
	return firstError(errs, func(i int) string { return "record rollout " + rollout + " device " + devs[i].Device })
}

func (r *rollouts) putDevice(ctx context.Context, rollout string, d *model.RolloutDevice) error {
	b, _ := json.Marshal(d)
	if _, err := r.rollouts.Put(ctx, deviceKey(rollout, d.Device), b); err != nil {
		return fmt.Errorf("record rollout %s device %s: %w", rollout, d.Device, err)
	}
	return nil
}

// Transition is an operator's change to a rollout: pause, resume, abort,
// or undo (and abort with revert), whose signed request each reverted
// device's desired state carries; the engine sets the devices back.
func (r *rollouts) Transition(ctx context.Context, a model.RolloutRef, signed *model.Signed) (*model.Rollout, error) {
	id, verb := a.ID, a.Action
	for {
		ro, rev, err := r.Get(ctx, id)
		if err != nil {
			return nil, err
		}
		switch {
		case verb == model.RolloutPause:
			if ro.State != model.RolloutRunning && ro.State != model.RolloutPending {
				return nil, conflict("rollout %s is %s: only a running rollout can be paused", id, ro.State)
			}
			ro.State, ro.Reason = model.RolloutPaused, "paused by an operator"
		case verb == model.RolloutResume:
			if ro.State != model.RolloutPaused {
				return nil, conflict("rollout %s is %s: only a paused rollout can be resumed", id, ro.State)
			}
			// The engine retries the current batch's failed devices.
			ro.State, ro.Reason = model.RolloutRunning, "resumed"
			ro.BatchStarted = time.Time{}
		case a.Reverts():
			if ro.State == model.RolloutReverted || ro.State == model.RolloutReverting {
				return nil, conflict("rollout %s is already %s", id, ro.State)
			}
			if verb == model.RolloutAbort && ro.State.Finished() {
				return nil, conflict("rollout %s is already %s: undo it with fleet-admin rollout undo %s", id, ro.State, id)
			}
			if a.ReleaseID != ro.ReleaseID {
				return nil, badRequest("the request undoes release %q, but rollout %s rolled out %q", a.ReleaseID, id, ro.ReleaseID)
			}
			if signed == nil {
				return nil, badRequest("an undo must be a signed request")
			}
			ro.State, ro.Undo = model.RolloutReverting, signed
			ro.Reason = "undone by an operator: setting its devices back"
			if verb == model.RolloutAbort {
				ro.Reason = "aborted and reverted by an operator: setting its devices back"
			}
		case verb == model.RolloutAbort:
			if ro.State.Finished() {
				return nil, conflict("rollout %s is already %s", id, ro.State)
			}
			ro.State, ro.Reason = model.RolloutAborted, "aborted by an operator"
		case verb == model.RolloutUndo:
			return nil, badRequest("undo needs the rollout's release (fleet-admin rollout undo signs it)")
		default:
			return nil, badRequest("unknown rollout action %q (pause, resume, abort or undo)", verb)
		}
		ro.UpdatedAt = time.Now().UTC()
		b, _ := json.Marshal(ro)
		if _, err := r.rollouts.Update(ctx, id, b, rev); err != nil {
			if isWrongRevision(err) {
				continue // the engine moved it meanwhile: decide again
			}
			return nil, fmt.Errorf("update rollout %s: %w", id, err)
		}
		if ro.State == model.RolloutReverting {
			r.follow(id, ro)
		}
		return ro, nil
	}
}

func isWrongRevision(err error) bool {
	var apiErr *jetstream.APIError
	// A replicated stream answers a conflicting write in a batch with
	// a code of its own.
	return errors.As(err, &apiErr) &&
		(apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// Run runs the engine while ctx lasts: it takes the lock when free, and
// while holding it drives every unfinished rollout.
func (r *rollouts) Run(ctx context.Context) {
	for ctx.Err() == nil {
		rev, err := r.takeLock(ctx)
		if err != nil {
			// Someone else leads; try again when their lock may have lapsed.
			select {
			case <-ctx.Done():
				return
			case <-time.After(engineLockRenew):
			}
			continue
		}
		r.log.Info().Msg("rollout engine: leading")
		r.leading.Store(true)
		r.lead(ctx, rev)
		r.leading.Store(false)
		r.log.Info().Msg("rollout engine: stopped leading")
	}
}

// takeLock takes the engine lock when it is free, or when it is this
// coordinator's own from before a restart (no need to wait out the TTL).
func (r *rollouts) takeLock(ctx context.Context) (uint64, error) {
	rev, err := r.locks.Create(ctx, engineLockKey, []byte(r.name))
	if err == nil {
		return rev, nil
	}
	e, gerr := r.locks.Get(ctx, engineLockKey)
	if gerr == nil && string(e.Value()) == r.name {
		return r.locks.Update(ctx, engineLockKey, []byte(r.name), e.Revision())
	}
	return 0, err
}

// lead drives rollouts while the lock holds. When ctx ends (the
// coordinator stops) it releases the lock, so another coordinator of the
// cluster takes over at once instead of after the lock's TTL.
func (r *rollouts) lead(ctx context.Context, rev uint64) {
	// The lease is renewed apart from the work, which may block longer
	// than the lease lasts: the moment it is lost (or cannot be confirmed
	// within most of its TTL) the work's context ends, so a leader that
	// lost the lock stops writing at once.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var held atomic.Uint64
	held.Store(rev)
	renewed := make(chan struct{})
	go func() {
		defer close(renewed)
		r.renew(ctx, cancel, &held)
	}()
	defer func() {
		cancel()
		<-renewed
		r.releaseLock(held.Load())
		// Not leading: nothing is driven or cached (see follow, record).
		r.mu.Lock()
		r.cache, r.active = nil, nil
		r.mu.Unlock()
	}()
	cons, err := r.js.CreateOrUpdateConsumer(ctx, subjects.StreamEvents, jetstream.ConsumerConfig{
		Durable:       engineConsumer,
		FilterSubject: subjects.AllEvents,
		AckPolicy:     jetstream.AckExplicitPolicy,
		DeliverPolicy: jetstream.DeliverNewPolicy,
		AckWait:       30 * time.Second,
		MaxAckPending: 4 * resultBatch,
	})
	if err != nil {
		r.log.Error().Err(err).Msg("rollout engine: events consumer")
		return
	}
	events := make(chan jetstream.Msg, 4*resultBatch)
	cc, err := cons.Consume(func(m jetstream.Msg) {
		select {
		case events <- m:
		case <-ctx.Done():
		}
	})
	if err != nil {
		r.log.Error().Err(err).Msg("rollout engine: consume events")
		return
	}
	defer cc.Stop()
	recorded := make(chan struct{})
	go func() {
		defer close(recorded)
		r.recordResults(ctx, events)
	}()
	defer func() { <-recorded }()
	converged := make(chan struct{})
	go func() {
		defer close(converged)
		r.convergeLoop(ctx)
	}()
	defer func() { <-converged }()

	r.mu.Lock()
	r.cache, r.active = map[string]*engineCache{}, map[string]bool{}
	r.mu.Unlock()
	// One watcher over the summaries (single-token keys) keeps the set of
	// rollouts to drive.
	watch, err := r.rollouts.WatchFiltered(ctx, []string{"*"})
	if err != nil {
		r.log.Error().Err(err).Msg("rollout engine: watch rollouts")
		return
	}
	defer func() { _ = watch.Stop() }()

	tick := time.NewTicker(engineTick)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-watch.Updates():
			if !ok {
				r.log.Warn().Msg("rollout engine: rollout watch ended")
				return
			}
			if e != nil {
				r.track(e)
			}
		case <-tick.C:
			r.step(ctx)
		case <-r.kick:
			r.step(ctx)
		}
	}
}

// renew keeps the engine lock (revision in held) until ctx ends, and calls
// lost when it is gone or could not be confirmed for two thirds of its
// TTL; held is 0 then.
func (r *rollouts) renew(ctx context.Context, lost context.CancelFunc, held *atomic.Uint64) {
	t := time.NewTicker(engineLockRenew)
	defer t.Stop()
	confirmed := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, engineLockRenew/2)
		rev, err := r.locks.Update(rctx, engineLockKey, []byte(r.name), held.Load())
		if isWrongRevision(err) {
			// A renewal that timed out may have been written all the same:
			// the lock still names this engine, at a newer revision.
			if e, gerr := r.locks.Get(rctx, engineLockKey); gerr == nil && string(e.Value()) == r.name && e.Revision() > held.Load() {
				rev, err = e.Revision(), nil
			}
		}
		cancel()
		if err == nil {
			held.Store(rev)
			confirmed = time.Now()
			continue
		}
		if ctx.Err() != nil {
			return
		}
		if isWrongRevision(err) || errors.Is(err, jetstream.ErrKeyNotFound) || time.Since(confirmed) > engineLockTTL*2/3 {
			r.log.Warn().Err(err).Msg("rollout engine: lost the lock; stopping at once")
			held.Store(0)
			lost()
			return
		}
		r.log.Warn().Err(err).Msg("rollout engine: lock not renewed yet; retrying")
	}
}

// releaseLock deletes the engine lock if it is still this coordinator's
// (at revision rev).
func (r *rollouts) releaseLock(rev uint64) {
	if rev == 0 {
		return // lost it already
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := r.locks.Delete(ctx, engineLockKey, jetstream.LastRevision(rev)); err != nil {
		r.log.Debug().Err(err).Msg("rollout engine: release the lock")
	}
}

// resultBatch is the most results recorded with one bulk write.
const resultBatch = 1024

// recordResults records devices' apply results in their rollouts, as many
// as have arrived at a time with one bulk write (a fleet's results would
// otherwise be a write and a round trip each, one after another), and
// acknowledges each event once its result is recorded.
func (r *rollouts) recordResults(ctx context.Context, events <-chan jetstream.Msg) {
	for {
		var batch []jetstream.Msg
		select {
		case <-ctx.Done():
			return
		case m := <-events:
			batch = append(batch, m)
		}
	more:
		for len(batch) < resultBatch {
			select {
			case m := <-events:
				batch = append(batch, m)
			default:
				break more
			}
		}
		r.recordBatch(ctx, batch)
	}
}

// result is one event's change to its rollout device.
type result struct {
	m       jetstream.Msg
	rollout string
	dev     *model.RolloutDevice // the engine's entry
	next    model.RolloutDevice  // what it becomes
}

func (r *rollouts) recordBatch(ctx context.Context, batch []jetstream.Msg) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var todo []result
	for _, m := range batch {
		res, ok := r.resultOf(ctx, m)
		if ok {
			todo = append(todo, res)
		}
	}
	if len(todo) == 0 {
		return
	}
	msgs := make([]bulkMsg, len(todo))
	for i, t := range todo {
		b, _ := json.Marshal(&t.next)
		msgs[i] = bulkMsg{subj: subjects.KVKey(subjects.BucketRollouts, deviceKey(t.rollout, t.next.Device)), data: b}
	}
	wctx, cancel := context.WithTimeout(ctx, desiredWriteWindow)
	defer cancel()
	_, errs := publishBulk(wctx, r.js, msgs)
	for i, t := range todo {
		if errs[i] != nil {
			// Redelivered, and counted then: the entry takes the result
			// only once it is recorded.
			r.log.Warn().Err(errs[i]).Msg("rollout engine: record result")
			_ = t.m.Nak()
			continue
		}
		*t.dev = t.next
		_ = t.m.Ack()
		r.log.Debug().Str("rollout", t.rollout).Str("device", t.next.Name).Str("result", string(t.next.State)).Msg("rollout device done")
	}
	r.poke()
}

// resultOf reads one event: the change it makes to a device of a rollout
// the engine drives, or false when it makes none (the event is settled
// then: acknowledged, or left for redelivery when it could not be read).
func (r *rollouts) resultOf(ctx context.Context, m jetstream.Msg) (result, bool) {
	var ev model.Event
	if err := json.Unmarshal(m.Data(), &ev); err != nil || !ev.Result.Final() || ev.RolloutID == "" {
		_ = m.Ack()
		return result{}, false
	}
	dev, ok := subjects.DeviceFromSubject(m.Subject())
	if !ok {
		_ = m.Ack()
		return result{}, false
	}
	var d *model.RolloutDevice
	if c := r.cache[ev.RolloutID]; c != nil {
		d = c.byID[dev]
	} else if model.CheckRolloutID(ev.RolloutID) == nil {
		var err error
		d, err = r.getDevice(ctx, ev.RolloutID, dev)
		if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			// A read that failed is not an answer: acknowledging would
			// lose the device's result. Redelivered in a moment.
			r.log.Warn().Err(err).Msg("rollout engine: read a result's device; will retry")
			_ = m.NakWithDelay(time.Second)
			return result{}, false
		}
	}
	if d == nil {
		_ = m.Ack() // not a device of that rollout (or no such rollout)
		return result{}, false
	}
	if d.State != model.DeviceWaiting || ev.StorePath != "" && ev.StorePath != d.StorePath {
		_ = m.Ack()
		return result{}, false
	}
	nd := *d
	switch ev.Result {
	case model.ResultSucceeded, model.ResultUnchanged:
		nd.State = model.DeviceSucceeded
		nd.Error = ""
	default:
		nd.State = model.DeviceFailed
		nd.Error = string(ev.Result)
		if ev.Error != "" {
			nd.Error += ": " + ev.Error
		}
		if ev.Check != "" {
			nd.Error += " (check " + ev.Check + ")"
		}
	}
	nd.Finished = time.Now().UTC()
	return result{m: m, rollout: ev.RolloutID, dev: d, next: nd}, true
}

func (r *rollouts) poke() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// track follows a summary change: pending and running rollouts are driven.
func (r *rollouts) track(e jetstream.KeyValueEntry) {
	var ro model.Rollout
	if e.Operation() != jetstream.KeyValuePut || json.Unmarshal(e.Value(), &ro) != nil {
		r.follow(e.Key(), nil)
		return
	}
	r.follow(e.Key(), &ro)
}

// follow drives rollout id while it is pending or running (ro nil: gone).
func (r *rollouts) follow(id string, ro *model.Rollout) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.active == nil {
		return // not leading: the leader's watch delivers it
	}
	if ro == nil || ro.State != model.RolloutPending && ro.State != model.RolloutRunning && ro.State != model.RolloutReverting {
		delete(r.active, id)
		delete(r.cache, id)
		return
	}
	if !r.active[id] {
		r.active[id] = true
		r.poke()
	}
}

// step advances every pending or running rollout once.
func (r *rollouts) step(ctx context.Context) {
	r.mu.Lock()
	ids := make([]string, 0, len(r.active))
	for id := range r.active {
		ids = append(ids, id)
	}
	r.mu.Unlock()
	slices.Sort(ids)
	for _, id := range ids {
		if err := r.advance(ctx, id); err != nil {
			r.log.Warn().Err(err).Str("rollout", id).Msg("rollout engine: advance")
		}
	}
}

// engineDevices returns the rollout's device progress from the cache, read
// again from the bucket when the summary changed behind the engine's back.
func (r *rollouts) engineDevices(ctx context.Context, ro *model.Rollout, rev uint64) ([]*model.RolloutDevice, error) {
	if c := r.cache[ro.ID]; c != nil && c.rev == rev {
		return c.devs, nil
	}
	devs, err := r.Devices(ctx, ro)
	if err != nil {
		return nil, err
	}
	c := &engineCache{rev: rev, devs: devs, byID: make(map[string]*model.RolloutDevice, len(devs))}
	for _, d := range devs {
		c.byID[d.Device] = d
	}
	r.cache[ro.ID] = c
	return devs, nil
}

// advance moves one rollout forward: start its batch, time out devices,
// judge a finished batch.
func (r *rollouts) advance(ctx context.Context, id string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	ro, rev, err := r.Get(ctx, id)
	if err != nil {
		return err
	}
	if ro.State != model.RolloutPending && ro.State != model.RolloutRunning && ro.State != model.RolloutReverting {
		return nil
	}
	devs, err := r.engineDevices(ctx, ro, rev)
	if err != nil {
		return err
	}
	orig := *ro
	now := time.Now().UTC()
	if ro.State == model.RolloutReverting {
		return r.undo(ctx, &orig, ro, devs, rev, now)
	}
	ro.State = model.RolloutRunning

	if ro.BatchStarted.IsZero() {
		// Start (or, after a resume, restart) the current batch: write the
		// desired state of its devices that still need it.
		if err := r.startBatch(ctx, ro, devs, now); err != nil {
			// A write the server refuses (e.g. a desired state over the
			// size limit) fails the same way on every retry: stop here,
			// saying why, rather than retrying each tick for ever.
			var apiErr *jetstream.APIError
			if errors.As(err, &apiErr) {
				ro.State, ro.Reason = model.RolloutFailed, "cannot write desired states: "+err.Error()
				return r.save(ctx, &orig, ro, devs, rev)
			}
			return err
		}
		ro.BatchStarted = now
		return r.save(ctx, &orig, ro, devs, rev)
	}

	timeout := time.Duration(ro.HealthTimeout)
	done := true
	for _, d := range devs {
		if d.Batch != ro.Batch {
			continue
		}
		if d.State == model.DeviceWaiting && now.Sub(d.Started) > timeout {
			d.State = model.DeviceTimedOut
			d.Error = fmt.Sprintf("no result within %s (offline or still applying)", timeout)
			d.Finished = now
			if err := r.putDevice(ctx, ro.ID, d); err != nil {
				return err
			}
		}
		if !d.State.Done() {
			done = false
		}
	}
	failed := 0
	for _, d := range devs {
		if d.State.Failed() {
			failed++
		}
	}
	if failed > ro.MaxFailures.Of(len(devs)) {
		if ro.OnFailure == model.OnFailureRevert {
			if _, _, err := r.revert(ctx, ro, devs, now, ro.Request, false); err != nil {
				return err
			}
			ro.State = model.RolloutReverted
			ro.Reason = fmt.Sprintf("%d device(s) failed (max %s): earlier batches set back to their previous generation", failed, ro.MaxFailures)
		} else {
			ro.State = model.RolloutPaused
			ro.Reason = fmt.Sprintf("%d device(s) failed (max %s): fix and resume, or abort", failed, ro.MaxFailures)
		}
		return r.save(ctx, &orig, ro, devs, rev)
	}
	if !done {
		return r.save(ctx, &orig, ro, devs, rev)
	}
	if ro.Batch+1 >= len(ro.BatchSizes) {
		ro.State = model.RolloutSucceeded
		ro.Reason = ""
		if failed > 0 {
			ro.Reason = fmt.Sprintf("%d device(s) failed, within the allowed %s", failed, ro.MaxFailures)
		}
		return r.save(ctx, &orig, ro, devs, rev)
	}
	ro.Batch++
	ro.BatchStarted = time.Time{}
	r.poke() // start the next batch without waiting for the tick
	return r.save(ctx, &orig, ro, devs, rev)
}

// startBatch writes the desired state of every device of the current batch
// that has not got it or failed before (a resume retries those).
func (r *rollouts) startBatch(ctx context.Context, ro *model.Rollout, devs []*model.RolloutDevice, now time.Time) error {
	began := time.Now()
	if len(devs) >= batchGCFrom {
		defer batchGC.hold()()
	}
	phases := zerolog.Dict()
	phase := func(name string) { phases.Dur(name, time.Since(began)) }
	rel, signed, err := r.release(ctx, ro.ReleaseID)
	if err != nil {
		return err
	}
	// A device revoked, removed or sent back to approval since the
	// snapshot gets no desired state: it is skipped, not failed. Only
	// devices this rollout holds the claim of are driven; another rollout
	// took the others. Both read at once: a whole fleet's of each.
	var claims map[string]string
	claimsRead := make(chan error, 1)
	cached := r.cache[ro.ID]
	go func() {
		var err error
		claims, err = r.batchClaims(ctx, ro.ID, cached, devs)
		claimsRead <- err
	}()
	all, err := r.currentDevices(ctx)
	if cerr := <-claimsRead; err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	current := make(map[string]model.Device, len(all))
	for _, d := range all {
		current[d.ID] = d
	}
	phase("devices")
	var batch, gone []*model.RolloutDevice
	for _, d := range devs {
		if d.Batch != ro.Batch || !(d.State == model.DeviceQueued || d.State.Failed()) {
			continue
		}
		owner, ok := claims[d.Device]
		if !ok {
			// Unclaimed (a rollout from before claims existed): take it
			// now, or learn who did.
			if _, err := r.claims.Create(ctx, d.Device, []byte(ro.ID)); err == nil {
				owner = ro.ID
			} else if e, gerr := r.claims.Get(ctx, d.Device); gerr == nil {
				owner = string(e.Value())
			} else {
				return fmt.Errorf("claim %s: %w", d.Name, err)
			}
		}
		if owner != ro.ID {
			d.State, d.Error, d.Finished = model.DeviceSuperseded, "claimed by rollout "+owner, now
			gone = append(gone, d)
			continue
		}
		if rec, ok := current[d.Device]; !ok || rec.Status != model.DeviceActive {
			why := "removed since the rollout started"
			if ok {
				why = "device is " + string(rec.Status) + " since the rollout started"
			}
			d.State, d.Error, d.Finished = model.DeviceSkipped, why, now
			gone = append(gone, d)
			continue
		}
		batch = append(batch, d)
	}
	if err := r.putDevices(ctx, ro.ID, gone); err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, desiredWriteWindow)
	defer cancel()
	msgs := make([]bulkMsg, len(batch))
	// Encoded on every core: a whole fleet's are tens of megabytes.
	parts := min(runtime.GOMAXPROCS(0), 1+len(batch)/1024)
	var encoded sync.WaitGroup
	for p := range parts {
		encoded.Go(func() {
			for i := p; i < len(batch); i += parts {
				d := batch[i]
				des := model.Desired{
					Device: d.Device, ReleaseID: ro.ReleaseID, RolloutID: ro.ID, StorePath: d.StorePath,
					Action: rel.Action, Release: *signed, IssuedAt: now, Deploy: ro.Request,
				}
				if rec := current[d.Device]; ro.Kind == model.KindConverge && rec.Pin == nil {
					// The newer statement that moved (or unpinned) the
					// device lets it take the group's older deploy.
					des.Join = rec.Statement
				}
				b, _ := json.Marshal(des)
				// Straight to the bucket's subject, a window at a time.
				// Told by the engine as each is written, not by the
				// bucket's change notification.
				msgs[i] = bulkMsg{subj: subjects.KVKey(subjects.BucketDesired, d.Device), data: b, header: announcedHeader}
			}
		})
	}
	encoded.Wait()
	phase("prepared")
	// Each device is told as soon as its desired state is written, while
	// the rest of the batch is being written: the last device of a large
	// batch then hears of it a write's time after the last write, not
	// after all the batch's writes, records and triggers one after the
	// other. Its result cannot overtake its "waiting" record below: the
	// engine takes results only once this step is over (r.mu).
	tell, told := r.announcer(len(batch))
	_, errs := publishBulkEach(wctx, r.js, msgs, func(i int, ack *jetstream.PubAck) {
		rec := current[batch[i].Device]
		tell(announcement{id: batch[i].Device, site: siteOf(&rec), seq: ack.Sequence, value: msgs[i].data})
	})
	phase("written")
	told()
	phase("announced")
	// The devices whose desired state is written are waiting, whatever
	// became of the others. An engine that dies before this record is
	// written leaves them queued, and the next one writes and tells them
	// again: an agent that has switched already finds its system active
	// and reports "unchanged" at once, the result the new engine takes.
	var written []*model.RolloutDevice
	for i, d := range batch {
		if errs[i] != nil {
			continue
		}
		d.State = model.DeviceWaiting
		d.Error = ""
		d.Started = now
		d.Finished = time.Time{}
		written = append(written, d)
	}
	err = r.putDevices(ctx, ro.ID, written)
	phase("recorded")
	if err != nil {
		return err
	}
	if err := firstError(errs, func(i int) string { return "write desired state of " + batch[i].Name }); err != nil {
		return err
	}
	r.log.Info().Str("rollout", ro.ID).Int("batch", ro.Batch+1).Int("devices", len(batch)).
		Dur("began_after_created", began.Sub(ro.CreatedAt)).Dict("after", phases).Msg("rollout batch started")
	return nil
}

// desiredNotifier tells devices of the desired states the engine wrote
// (services.announcer).
type desiredNotifier interface {
	announcer(n int) (tell func(announcement), done func())
}

// announcedHeader marks the engine's bulk writes of desired states: the
// engine tells those devices itself (see subjects.HeaderAnnounced).
var announcedHeader = nats.Header{subjects.HeaderAnnounced: []string{"engine"}}

// announcer tells devices of the desired states the engine writes; without
// a notifier (a test's engine alone) nobody is told.
func (r *rollouts) announcer(n int) (tell func(announcement), done func()) {
	if r.notify == nil || n == 0 {
		return func(announcement) {}, func() {}
	}
	return r.notify.announcer(n)
}

// revert sets every device this rollout touched back to its previous
// desired state, signed by way the back: the deploy that asked to revert
// on failure, or an operator's undo. With own, only devices whose desired
// state is still this rollout's are set back (a finished rollout's
// devices may have moved on since); the others are left and say so.
func (r *rollouts) revert(ctx context.Context, ro *model.Rollout, devs []*model.RolloutDevice, now time.Time, way *model.Signed, own bool) (back, left int, err error) {
	for _, d := range devs {
		if d.State == model.DeviceQueued || d.State == model.DeviceSkipped || d.State == model.DeviceSuperseded || d.State == model.DeviceReverted {
			continue
		}
		if own {
			e, err := r.desired.Get(ctx, d.Device)
			var cur model.Desired
			switch {
			case errors.Is(err, jetstream.ErrKeyNotFound):
				cur.RolloutID = ""
			case err != nil:
				return back, left, fmt.Errorf("read desired state of %s: %w", d.Name, err)
			default:
				_ = json.Unmarshal(e.Value(), &cur)
			}
			if cur.RolloutID != ro.ID {
				d.Error = strings.TrimPrefix(d.Error+"; left alone: its desired state is now "+orDash(cur.RolloutID)+"'s", "; ")
				left++
				if err := r.putDevice(ctx, ro.ID, d); err != nil {
					return back, left, err
				}
				continue
			}
		}
		prev, err := d.PreviousDesired()
		if err != nil {
			r.log.Warn().Err(err).Str("rollout", ro.ID).Msg("revert: the previous desired state does not decode")
		}
		if prev == nil {
			// Nothing signed to go back to: leave the device where it is
			// (an agent whose health checks failed has rolled back itself).
			d.Error = strings.TrimPrefix(d.Error+"; no previous release to revert to", "; ")
			if err := r.desired.Delete(ctx, d.Device); err != nil {
				return back, left, fmt.Errorf("clear desired state of %s: %w", d.Name, err)
			}
		} else {
			prev.IssuedAt = now
			// The way back is signed too (the agent checks it).
			prev.Revert = way
			b, _ := json.Marshal(prev)
			if _, err := r.desired.Put(ctx, d.Device, b); err != nil {
				return back, left, fmt.Errorf("revert desired state of %s: %w", d.Name, err)
			}
		}
		d.State = model.DeviceReverted
		d.Finished = now
		back++
		if err := r.putDevice(ctx, ro.ID, d); err != nil {
			return back, left, err
		}
	}
	return back, left, nil
}

// undo carries out an operator's undo (or abort with revert): devices not
// started yet are skipped, the others set back, and the rollout is
// reverted.
func (r *rollouts) undo(ctx context.Context, orig, ro *model.Rollout, devs []*model.RolloutDevice, rev uint64, now time.Time) error {
	var queued []*model.RolloutDevice
	// A batch not recorded as started may have been written and told in
	// part by an engine that stopped before it recorded them (startBatch):
	// a device whose desired state is this rollout's is set back like any
	// it started. The fleet's desired states are read once, not per device.
	var current map[string]storedDesired
	if ro.BatchStarted.IsZero() && slices.ContainsFunc(devs, func(d *model.RolloutDevice) bool {
		return d.State == model.DeviceQueued && d.Batch == ro.Batch
	}) {
		var err error
		if current, err = r.currentDesired(ctx); err != nil {
			return fmt.Errorf("read desired states: %w", err)
		}
	}
	for _, d := range devs {
		if d.State != model.DeviceQueued {
			continue
		}
		if d.Batch == ro.Batch && current[d.Device].ref.RolloutID == ro.ID {
			d.State = model.DeviceWaiting
			continue
		}
		d.State, d.Error, d.Finished = model.DeviceSkipped, "rollout undone before its batch", now
		queued = append(queued, d)
	}
	if err := r.putDevices(ctx, ro.ID, queued); err != nil {
		return err
	}
	back, left, err := r.revert(ctx, ro, devs, now, ro.Undo, true)
	if err != nil {
		return err
	}
	ro.State = model.RolloutReverted
	ro.Reason = fmt.Sprintf("undone by an operator: %s set back to their previous desired state", plural(back, "device"))
	if left > 0 {
		ro.Reason += fmt.Sprintf(", %s left alone (a later rollout changed them)", plural(left, "device"))
	}
	if len(queued) > 0 {
		ro.Reason += fmt.Sprintf(", %s never started", plural(len(queued), "device"))
	}
	return r.save(ctx, orig, ro, devs, rev)
}

// plural is "1 device" or "n devices".
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// save writes the summary with fresh counts when it changed from orig. If an operator changed the
// rollout meanwhile (pause, abort), their change wins and the engine looks
// again on its next tick.
func (r *rollouts) save(ctx context.Context, orig, ro *model.Rollout, devs []*model.RolloutDevice, rev uint64) error {
	ro.Counts = map[model.DeviceRolloutState]int{}
	for _, d := range devs {
		ro.Counts[d.State]++
	}
	// Most steps change nothing: write only what changed, so results
	// arriving one by one do not each cost a summary write.
	before, _ := json.Marshal(orig)
	after, _ := json.Marshal(ro)
	if string(before) == string(after) {
		return nil
	}
	ro.UpdatedAt = time.Now().UTC()
	b, _ := json.Marshal(ro)
	next, err := r.rollouts.Update(ctx, ro.ID, b, rev)
	if err != nil {
		delete(r.cache, ro.ID) // read it all again next time
		if isWrongRevision(err) {
			return nil
		}
		return fmt.Errorf("record rollout %s: %w", ro.ID, err)
	}
	if c := r.cache[ro.ID]; c != nil {
		c.rev = next
	}
	if ro.State.Finished() || ro.State == model.RolloutPaused {
		r.log.Info().Str("rollout", ro.ID).Str("state", string(ro.State)).Str("reason", ro.Reason).Msg("rollout stopped")
	}
	return nil
}
