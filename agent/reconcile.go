package agent

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/model"
	"fleet/subjects"
)

// Options configure an Agent.
type Options struct {
	DeviceID string
	// Key is the device's identity key: it signs facts and events, so no
	// one between the device and the coordinator can forge them.
	Key nkeys.KeyPair
	// Site is where the device connects (its creds' site tag): its inbox,
	// where the coordinator's triggers arrive, names it.
	Site     string
	Hostname string
	StateDir string
	// ReleaseSigners are the admin keys trusted to sign releases; empty
	// refuses every release.
	ReleaseSigners  []string
	Activator       Activator
	Checks          []Retrying
	HealthDeadline  time.Duration
	ReconnectWithin time.Duration
	ApplyTimeout    time.Duration
	FactsInterval   time.Duration
	// Recheck is how often the desired state is read again (with jitter)
	// in case a trigger was lost while connected (default 15m).
	Recheck time.Duration
	Facts   []FactSource
	Log     zerolog.Logger
	// MDM configures remote commands, sealed payloads and escrow.
	MDM MDMOptions
}

// Agent keeps one device on its desired generation. One goroutine applies,
// so there is one apply at a time; desired states arriving meanwhile are
// coalesced to the newest.
type Agent struct {
	o   Options
	nc  *nats.Conn
	rep *reporter
	// repReady is rep for the connection's callbacks, which may run
	// before Run has made it.
	repReady atomic.Pointer[reporter]
	log      zerolog.Logger

	// applyMu is held for the whole of an apply (or a resumed one) and by
	// a rollback command, so the two never switch the profile at once.
	applyMu sync.Mutex

	mu sync.Mutex
	st *ApplyState
	// needGet asks the loop to read the desired state: on (re)connect, on
	// a trigger from the coordinator, and on the safety-net timer.
	needGet bool
	// pushed is the newest desired state a trigger carried, not handled
	// yet; seenSeq the sequence of the newest one accepted (its
	// signatures and statement checked: a forged sequence cannot make the
	// agent skip real states), so an older one arriving late (a read
	// answered before a push) is skipped.
	pushed  *DesiredMsg
	seenSeq uint64
	wake    chan struct{}
	factsCh chan struct{}
	// inbox routes the device inbox's one subscription (Run).
	inbox deviceInbox
	// factsCheck asks for a facts report if they changed (a paced apply's
	// facts, see model.Pace); until factsHeld the periodic check leaves
	// them to it.
	factsCheck chan struct{}
	factsHeld  time.Time
	factsTimer *time.Timer // sends factsCheck at factsHeld
	// refusedKey is the last desired state refused on verification (bad
	// signature, unknown signer). It is not persisted: after a restart,
	// perhaps with a fixed --release-signer, it is checked again.
	refusedKey string
}

// New prepares an agent; OnConnect must be wired to the connection's
// connect and reconnect callbacks before Run.
func New(o Options) (*Agent, error) {
	if o.ReleaseSigners == nil {
		o.ReleaseSigners = []string{} // nil would mean "any signer"
	}
	if o.Key == nil {
		return nil, errors.New("agent: no device key to sign reports with")
	}
	// Every report is signed: derive the signing key once, not per report.
	o.Key = accounts.FastKey(o.Key)
	if o.Site == "" {
		o.Site = subjects.DefaultSite
	}
	st, err := LoadState(o.StateDir)
	if err != nil {
		return nil, err
	}
	return &Agent{o: o, st: st, log: o.Log, inbox: deviceInbox{log: o.Log}, needGet: true,
		wake: make(chan struct{}, 1), factsCh: make(chan struct{}, 1), factsCheck: make(chan struct{}, 1)}, nil
}

// OnConnect is the connection's (re)connect callback: re-read the desired
// state, send queued events and fresh facts.
func (a *Agent) OnConnect(*nats.Conn) {
	a.mu.Lock()
	a.needGet = true
	a.mu.Unlock()
	a.kick()
	a.kickFacts()
	if rep := a.repReady.Load(); rep != nil {
		rep.kick()
	}
}

func (a *Agent) kick() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// RefreshFacts asks for a facts report now.
func (a *Agent) RefreshFacts() { a.kickFacts() }

func (a *Agent) kickFacts() {
	select {
	case a.factsCh <- struct{}{}:
	default:
	}
}

// checkFacts asks for a facts report if they changed since the last.
func (a *Agent) checkFacts() {
	select {
	case a.factsCheck <- struct{}{}:
	default:
	}
}

// Run reconciles until ctx ends.
func (a *Agent) Run(ctx context.Context, nc *nats.Conn) error {
	a.nc = nc
	var err error
	if a.rep, err = newReporter(a.o.StateDir, nc, a.o.Key, a.log); err != nil {
		return err
	}
	a.repReady.Store(a.rep)
	// Every handler of the device's inbox is in place before it is
	// subscribed: once the server knows of the subscription, what the
	// coordinator sends there is handled.
	defer a.inbox.handle(subjects.DeviceNotify(a.o.Site, a.o.DeviceID), a.onNotify)()
	startMDM, stopMDM, err := a.startMDM(ctx)
	if err != nil {
		return err
	}
	defer stopMDM()
	sub, err := nc.Subscribe(subjects.DeviceInboxLeaves(a.o.Site, a.o.DeviceID), a.inbox.dispatch)
	if err != nil {
		return fmt.Errorf("subscribe to the device's inbox (triggers, commands): %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	startMDM()

	var wg sync.WaitGroup
	wg.Go(func() { a.rep.run(ctx) })
	wg.Go(func() { a.factsLoop(ctx) })
	defer func() {
		wg.Wait()
		// Last chance to send what is queued; the outbox keeps the rest.
		fctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		a.rep.flush(fctx)
		cancel()
	}()

	a.resume(ctx)
	// One timer: the jittered safety-net re-read, or a retry after an
	// error. Jitter keeps a fleet's re-reads spread out.
	recheck := a.o.Recheck
	if recheck <= 0 {
		recheck = 15 * time.Minute
	}
	jittered := func() time.Duration { return recheck*4/5 + rand.N(recheck*2/5+1) }
	timer := time.NewTimer(jittered())
	defer timer.Stop()
	for {
		if ctx.Err() != nil {
			return nil
		}
		m, err := a.next(ctx)
		if err != nil {
			a.log.Warn().Err(err).Msg("cannot read desired state; retrying")
			timer.Reset(5 * time.Second)
		} else if m != nil {
			a.handle(ctx, m)
			continue // something newer may have arrived meanwhile
		}
		select {
		case <-ctx.Done():
			return nil
		case <-a.wake:
		case <-timer.C:
			a.mu.Lock()
			a.needGet = true
			a.mu.Unlock()
			timer.Reset(jittered())
		}
	}
}

// onNotify receives the coordinator's trigger: the desired state changed.
// It carries the state, as a read's reply would: only the coordinator may
// publish into this device's inbox (no role's template allows it, and the
// coordinator answers only into the asker's own inbox), and what it
// carries is checked as any desired state is, against the release's and
// the deploy's signatures, before anything is applied. A trigger without
// a state asks the loop to read it.
func (a *Agent) onNotify(m *nats.Msg) {
	a.log.Debug().Msg("desired state trigger")
	d, err := ParseDesired(m.Data)
	a.mu.Lock()
	if err != nil || d.Seq == 0 {
		a.needGet = true
	} else if a.pushed == nil || d.Seq > a.pushed.Seq {
		a.pushed = &d
	}
	a.mu.Unlock()
	a.kick()
}

// next returns the newest desired state: the one a trigger carried, or
// one read when asked to; nil when there is none to take.
func (a *Agent) next(ctx context.Context) (*DesiredMsg, error) {
	a.mu.Lock()
	get, pushed := a.needGet, a.pushed
	a.needGet, a.pushed = false, nil
	a.mu.Unlock()
	var m *DesiredMsg
	// Not connected: OnConnect asks again.
	if get && a.nc.IsConnected() {
		got, err := getDesired(ctx, a.nc, a.o.DeviceID)
		if err != nil {
			a.mu.Lock()
			a.needGet = true
			if a.pushed == nil {
				a.pushed = pushed
			}
			a.mu.Unlock()
			return nil, err
		}
		m = &got
	}
	if pushed != nil && (m == nil || pushed.Seq > m.Seq) {
		m = pushed
	}
	if m == nil {
		return nil, nil
	}
	a.mu.Lock()
	stale := m.Seq != 0 && m.Seq < a.seenSeq
	a.mu.Unlock()
	if stale {
		return nil, nil
	}
	return m, nil
}

func newAttempt() string {
	b := make([]byte, 8)
	_, _ = crand.Read(b)
	return hex.EncodeToString(b)
}

// apply is one run through the states, for events.
type apply struct {
	attempt   string
	started   time.Time
	rolloutID string
	releaseID string
	path      string
	action    model.Action
	// fetches counts the fetch attempts (more than one: a passing failure
	// was retried); the final event says so.
	fetches int
	// cache is what the fetches read from the fleet cache; the final
	// event says so.
	cache model.CacheFetch
	// pace is the batch's (see model.Pace); nil reports as it goes.
	pace *model.Pace
}

// MaxEventLog bounds Event.Log (the tail is kept): events travel in one
// message each.
const MaxEventLog = 8 << 10

func capTail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[len(s)-n:]
	// Start on a whole UTF-8 character.
	for i := 0; i < len(s) && i < 4; i++ {
		if utf8.RuneStart(s[i]) {
			return s[i:]
		}
	}
	return s
}

func (a *Agent) event(ap *apply, state model.State, result model.Result, errMsg, check, log string) {
	log = capTail(log, MaxEventLog)
	ev := model.Event{
		Device: a.o.DeviceID, Time: time.Now().UTC(), State: state, Result: result,
		RolloutID: ap.rolloutID, ReleaseID: ap.releaseID, StorePath: ap.path,
		Error: errMsg, Check: check, Log: log, Attempt: ap.attempt,
	}
	if !ap.started.IsZero() {
		ev.DurationMS = time.Since(ap.started).Milliseconds()
	}
	if state == model.StateReporting && ap.cache != (model.CacheFetch{}) {
		ev.Cache = &ap.cache
	}
	msgID := model.EventMsgID(&ev)
	lg := a.log.Info()
	if errMsg != "" {
		lg = a.log.Warn().Str("error", errMsg)
	}
	lg.Str("state", string(state)).Str("result", string(result)).Str("attempt", ap.attempt).Str("store_path", ap.path).Msg("apply")
	var notBefore time.Time
	if wait := ap.pace.ProgressAfter(); wait > 0 && !result.Final() {
		notBefore = time.Now().Add(wait)
	}
	if err := a.rep.enqueue(subjects.DeviceEvents(a.o.DeviceID), msgID, ev, notBefore); err != nil {
		a.log.Error().Err(err).Msg("queue event")
	}
}

// finish records the end of an apply: final event first (queued durably),
// then the state, so a crash in between repeats the same event ID (which
// JetStream deduplicates) rather than losing it.
func (a *Agent) finish(ap *apply, key string, result model.Result, errMsg, check, log string) {
	a.finishKey(ap, key, key, result, errMsg, check, log)
}

// refuse finishes a desired state refused before anything was fetched
// (its manifest does not verify): it is remembered only until the agent
// restarts, so a fixed --release-signer lets it through then.
func (a *Agent) refuse(ap *apply, key, lastKey, errMsg string) {
	a.mu.Lock()
	a.refusedKey = key
	a.mu.Unlock()
	a.finishKey(ap, key, lastKey, model.ResultFailed, errMsg, "", "")
}

// finishKey is finish recording lastKey as the last desired state handled.
func (a *Agent) finishKey(ap *apply, key, lastKey string, result model.Result, errMsg, check, log string) {
	state := model.StateReporting
	if ap.fetches > 1 && result != model.ResultFailed && log == "" {
		log = fmt.Sprintf("fetched after %d attempts", ap.fetches)
	}
	a.event(ap, state, result, errMsg, check, log)
	a.mu.Lock()
	if key == lastKey {
		a.refusedKey = ""
	}
	a.st = &ApplyState{
		Statement: a.st.Statement,
		LastKey:   lastKey,
		Last: &model.LastApply{RolloutID: ap.rolloutID, ReleaseID: ap.releaseID, StorePath: ap.path,
			Result: result, Error: errMsg, Time: time.Now().UTC()},
	}
	st := *a.st
	a.mu.Unlock()
	if err := SaveState(a.o.StateDir, &st); err != nil {
		a.log.Error().Err(err).Msg("save apply state")
	}
	// No idle event follows: a final result ends the apply, and the
	// coordinator counts the device idle from it (one report fewer per
	// apply, for every device of a rollout).
	if splay := ap.pace.FactsSplay(); splay > 0 {
		// A whole batch finishes about together: its facts come spread
		// out.
		d := rand.N(splay) + 1
		a.mu.Lock()
		a.factsHeld = time.Now().Add(d)
		// One timer, moved by each paced apply: triggers (even refused
		// ones) cannot pile timers up.
		if a.factsTimer == nil {
			a.factsTimer = time.AfterFunc(d, a.checkFacts)
		} else {
			a.factsTimer.Reset(d)
		}
		a.mu.Unlock()
		return
	}
	a.kickFacts()
}

func (a *Agent) saveState(st ApplyState) error {
	a.mu.Lock()
	a.st = &st
	a.mu.Unlock()
	return SaveState(a.o.StateDir, &st)
}

func (a *Agent) state() ApplyState {
	a.mu.Lock()
	defer a.mu.Unlock()
	return *a.st
}

// handle takes one desired state through Checking → Fetching → Applying →
// Verifying → Reporting (or RollingBack).
func (a *Agent) handle(ctx context.Context, m *DesiredMsg) {
	a.applyMu.Lock()
	defer a.applyMu.Unlock()
	if m.Absent {
		a.log.Info().Msg("no desired state: staying on the current system")
		return
	}
	key := m.Key()
	cur := a.state()
	a.mu.Lock()
	refused := a.refusedKey
	a.mu.Unlock()
	if key == cur.LastKey || key == refused {
		return // handled already: the same desired state twice is a no-op
	}
	ap := &apply{attempt: newAttempt(), started: time.Now(), pace: m.Pace}
	ctx = WithAttempt(ctx, ap.attempt)
	if m.Desired != nil {
		ap.rolloutID, ap.releaseID, ap.path = m.Desired.RolloutID, m.Desired.ReleaseID, m.Desired.StorePath
	}
	a.event(ap, model.StateChecking, "", "", "", "")
	if m.Err != nil {
		a.finish(ap, key, model.ResultFailed, m.Err.Error(), "", "")
		return
	}
	// The manifest is verified before anything is fetched: a compromised
	// coordinator cannot make the device run a closure no admin signed.
	rel, path, err := m.Desired.Resolve(a.o.Hostname, a.o.ReleaseSigners)
	if err != nil {
		a.refuse(ap, key, cur.LastKey, err.Error())
		return
	}
	// An admin must have asked for this desired state, for this device,
	// and not before what the device already accepted: a coordinator (or
	// anyone who can write the bucket) cannot roll it back to an old
	// release on its own.
	stmt, err := model.CheckStatement(m.Desired, a.o.DeviceID, a.o.Hostname, a.o.ReleaseSigners, cur.Statement)
	if err != nil {
		a.refuse(ap, key, cur.LastKey, err.Error())
		return
	}
	cur.Statement = stmt
	a.mu.Lock()
	a.seenSeq = max(a.seenSeq, m.Seq)
	a.mu.Unlock()
	if err := a.saveState(cur); err != nil {
		a.finish(ap, key, model.ResultFailed, err.Error(), "", "")
		return
	}
	ap.path = path
	action, err := model.ParseAction(string(rel.Action))
	if err != nil {
		a.finish(ap, key, model.ResultFailed, err.Error(), "", "")
		return
	}
	ap.action = action
	if ok, _ := a.o.Activator.Active(ctx, path, action); ok {
		a.finish(ap, key, model.ResultUnchanged, "", "", "")
		return
	}

	actx, cancel := context.WithTimeout(ctx, a.o.ApplyTimeout)
	defer cancel()
	a.event(ap, model.StateFetching, "", "", "", "")
	if err := a.fetch(actx, ap, path, rel); err != nil {
		if ctx.Err() != nil {
			return // stopping: the desired state is handled after restart
		}
		a.finish(ap, key, model.ResultFailed, fmt.Sprintf("fetch (%d attempts): %v", ap.fetches, err), "", logTail(err))
		return
	}
	prev, err := a.o.Activator.Snapshot(actx)
	if err != nil {
		a.finish(ap, key, model.ResultFailed, "read current generation: "+err.Error(), "", "")
		return
	}
	st := ApplyState{
		Phase: PhaseSwitching, Attempt: ap.attempt, Started: ap.started,
		RolloutID: ap.rolloutID, ReleaseID: ap.releaseID, StorePath: path, Action: action,
		Key: key, Prev: prev, LastKey: cur.LastKey, Last: cur.Last, Statement: cur.Statement,
	}
	// Written before the switch: the switch may restart this very agent.
	if err := a.saveState(st); err != nil {
		a.finish(ap, key, model.ResultFailed, err.Error(), "", "")
		return
	}
	a.event(ap, model.StateApplying, "", "", "", "")
	if err := a.o.Activator.Switch(actx, path, action); err != nil {
		if ctx.Err() != nil {
			return // stopping mid-switch: resume decides after restart
		}
		a.rollback(ctx, ap, key, st, "switch: "+err.Error(), "", logTail(err))
		return
	}
	a.verify(ctx, ap, key, st)
}

// fetch fetches path, retrying with backoff while the failure is one that
// passes (a cache that is down or busy, the network, Nix's own database
// busy with another fetch) until ctx (the apply timeout) ends. A closure
// that is refused (a signature, a NAR file that does not match) fails at
// once.
func (a *Agent) fetch(ctx context.Context, ap *apply, path string, rel *model.Release) error {
	delay := time.Second
	for {
		ap.fetches++
		err := a.fetchOnce(ctx, path, rel, &ap.cache)
		if err == nil || !transientFetch(err) || ctx.Err() != nil {
			return err
		}
		a.log.Warn().Err(err).Int("attempt", ap.fetches).Dur("retry_in", delay).Msg("fetch failed for a passing reason; retrying")
		select {
		case <-ctx.Done():
			return err
		case <-time.After(delay):
		}
		delay = min(delay*2, 15*time.Second)
	}
}

// transientMarks are what Nix says when a fetch may work on a retry.
var transientMarks = []string{
	"HTTP error 5", "Couldn't connect", "Connection refused", "Connection reset", "timed out", "Timeout was reached",
	"Could not resolve host", "SQLite", "database is locked", "temporarily unavailable", "Failure when receiving data",
}

func transientFetch(err error) bool {
	if errors.Is(err, ErrCacheRefused) {
		return false
	}
	text := err.Error() + "\n" + logTail(err)
	if strings.Contains(text, "lacks a valid signature") {
		return false
	}
	for _, m := range transientMarks {
		if strings.Contains(text, m) {
			return true
		}
	}
	return false
}

// verify runs the broker check and the health checks, then reports or
// rolls back.
func (a *Agent) verify(ctx context.Context, ap *apply, key string, st ApplyState) {
	st.Phase = PhaseVerifying
	if err := a.saveState(st); err != nil {
		a.log.Error().Err(err).Msg("save apply state")
	}
	a.event(ap, model.StateVerifying, "", "", "", "")
	if ok, err := a.o.Activator.Active(ctx, st.StorePath, st.Action); err != nil || !ok {
		if ctx.Err() != nil {
			return
		}
		msg := "the new system is not active after the switch"
		if err != nil {
			msg += ": " + err.Error()
		}
		a.rollback(ctx, ap, key, st, msg, "", "")
		return
	}
	if st.Action == model.ActionBoot {
		// The running system did not change: checking it (or the broker)
		// would say nothing about the new one, which runs after a reboot.
		a.finish(ap, key, model.ResultSucceeded, "", "", BootNote)
		return
	}
	// Magic rollback: a system that cannot reach the coordinator again
	// cannot be managed, so it does not stay.
	if err := a.waitBroker(ctx, a.o.ReconnectWithin); err != nil {
		if ctx.Err() != nil {
			return
		}
		a.rollback(ctx, ap, key, st, err.Error(), "broker", "")
		return
	}
	if err := RunHealthChecks(ctx, a.o.Checks, a.o.HealthDeadline); err != nil {
		if ctx.Err() != nil {
			return
		}
		var cf *CheckFailed
		check := ""
		if errors.As(err, &cf) {
			check = cf.Check
		}
		a.rollback(ctx, ap, key, st, err.Error(), check, logTail(err))
		return
	}
	a.finish(ap, key, model.ResultSucceeded, "", "", "")
}

// BootNote is the Log of a succeeded boot apply.
const BootNote = "action boot: the new system is the default for the next boot and runs after a reboot; it was not activated or health-checked now"

// waitBroker waits until the connection is up and a round trip succeeds.
func (a *Agent) waitBroker(ctx context.Context, within time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		if a.nc.IsConnected() {
			fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
			err := a.nc.FlushWithContext(fctx)
			fcancel()
			if err == nil {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not connected to the coordinator within %s after the switch", within)
		case <-tick.C:
		}
	}
}

func (a *Agent) rollback(ctx context.Context, ap *apply, key string, st ApplyState, reason, check, log string) {
	st.Phase, st.Error, st.Check, st.Log = PhaseRollingBack, reason, check, log
	if err := a.saveState(st); err != nil {
		a.log.Error().Err(err).Msg("save apply state")
	}
	a.event(ap, model.StateRollingBack, "", reason, check, log)
	rctx, cancel := context.WithTimeout(ctx, a.o.ApplyTimeout)
	defer cancel()
	if st.Prev.System == "" {
		a.finish(ap, key, model.ResultFailed, reason+"; no previous system to roll back to", check, log)
		return
	}
	if err := a.o.Activator.Rollback(rctx, st.Prev, st.Action); err != nil {
		if ctx.Err() != nil {
			return
		}
		a.finish(ap, key, model.ResultFailed, reason+"; rollback failed: "+err.Error(), check, logTail(err))
		return
	}
	a.finish(ap, key, model.ResultRolledBack, reason, check, log)
}

// resume finishes an apply a restart interrupted: verify when the switch
// went through, else roll back.
func (a *Agent) resume(ctx context.Context) {
	a.applyMu.Lock()
	defer a.applyMu.Unlock()
	st := a.state()
	if st.Phase == PhaseNone {
		return
	}
	ap := &apply{attempt: st.Attempt, started: st.Started, rolloutID: st.RolloutID,
		releaseID: st.ReleaseID, path: st.StorePath, action: st.Action}
	key := st.Key
	ctx = WithAttempt(ctx, ap.attempt)
	a.log.Info().Str("phase", string(st.Phase)).Str("attempt", st.Attempt).Msg("resuming an interrupted apply")
	// A switch (or rollback) running in its own systemd unit outlives the
	// agent: decide only once it has finished.
	if w, ok := a.o.Activator.(interface {
		WaitActivations(ctx context.Context, attempt string) error
	}); ok {
		wctx, cancel := context.WithTimeout(ctx, a.o.ApplyTimeout)
		err := w.WaitActivations(wctx, st.Attempt)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			a.log.Warn().Err(err).Msg("waiting for the interrupted switch")
		}
	}
	switch st.Phase {
	case PhaseSwitching, PhaseVerifying:
		if st.Phase == PhaseSwitching && st.Action == model.ActionBoot {
			// The profile may be set without the boot loader written:
			// switch-to-configuration boot again (both steps repeat
			// harmlessly).
			actx, cancel := context.WithTimeout(ctx, a.o.ApplyTimeout)
			err := a.o.Activator.Switch(actx, st.StorePath, st.Action)
			cancel()
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				a.rollback(ctx, ap, key, st, "switch (resumed): "+err.Error(), "", logTail(err))
				return
			}
		}
		ok, err := a.o.Activator.Active(ctx, st.StorePath, st.Action)
		if err == nil && ok {
			a.verify(ctx, ap, key, st)
			return
		}
		a.rollback(ctx, ap, key, st, "the switch was interrupted and did not complete", "", "")
	case PhaseRollingBack:
		a.rollback(ctx, ap, key, st, st.Error, st.Check, st.Log)
	default:
		a.log.Warn().Str("phase", string(st.Phase)).Msg("unknown apply phase; forgetting it")
		st.Phase = PhaseNone
		_ = a.saveState(st)
	}
}

// factsLoop reports facts every interval (with jitter), on reconnect,
// after an apply and when the running or booted system changes.
func (a *Agent) factsLoop(ctx context.Context) {
	interval := a.o.FactsInterval
	if interval <= 0 {
		interval = model.FactsInterval
	}
	jitter := func() time.Duration {
		return interval*9/10 + rand.N(interval/5+1)
	}
	poll := min(interval, 15*time.Second)
	// The first round comes anywhere in the first interval (the connect
	// reports facts at once anyway): a fleet that (re)connects together,
	// after a coordinator restart or an outage, does not report in step
	// ever after.
	timer := time.NewTimer(rand.N(interval) + 1)
	defer timer.Stop()
	pollT := time.NewTicker(poll)
	defer pollT.Stop()
	var lastPrint string
	for {
		changedOnly := false
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
			timer.Reset(jitter())
		case <-a.factsCh:
		case <-a.factsCheck:
			changedOnly = true
		case <-pollT.C:
			a.mu.Lock()
			held := time.Now().Before(a.factsHeld)
			a.mu.Unlock()
			if held {
				continue
			}
			changedOnly = true
		}
		f := a.collect(ctx)
		fp := fingerprint(f)
		if changedOnly && fp == lastPrint {
			continue
		}
		lastPrint = fp
		if err := a.publishFacts(ctx, f); err != nil {
			a.log.Debug().Err(err).Msg("facts not published")
		}
	}
}

func (a *Agent) collect(ctx context.Context) model.Facts {
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	f := CollectFacts(cctx, a.o.DeviceID, a.o.Facts)
	if f.Hostname == "" {
		f.Hostname = a.o.Hostname
	}
	st := a.state()
	f.LastApply = st.Last
	return f
}

// fingerprint is what counts as a change worth an immediate report.
func fingerprint(f model.Facts) string {
	b, _ := json.Marshal([]any{f.CurrentSystem, f.BootedSystem, f.NixOSVersion, f.RebootNeeded, f.Encryption, f.LastApply, len(f.Mounts)})
	return string(b)
}

func (a *Agent) publishFacts(ctx context.Context, f model.Facts) error {
	if !a.nc.IsConnected() {
		return errors.New("not connected")
	}
	b, err := json.Marshal(f)
	if err != nil {
		return fmt.Errorf("encode facts: %w", err)
	}
	return sendReport(ctx, a.nc, a.o.Key, subjects.DeviceFacts(a.o.DeviceID), model.PurposeFacts, b)
}
