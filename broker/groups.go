package broker

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"fleet/model"
)

// Groups hold a target release (fleet_groups, DESIGN §3). A rollout that
// covers a whole group sets the group's target when it succeeds; a device
// that joins the group later (enrolled, approved, moved into it, unpinned)
// converges to it without a new deploy. The engine leader does both in a
// sweep over its device index:
//
//   - each group's target is its newest succeeded rollout that sets one
//     (an undone rollout gives the target back to the one before it);
//   - each active device wants its pin's release, else its groups' one
//     target (two groups with different targets are a conflict: nothing is
//     applied until an admin pins the device or fixes the groups);
//   - a device whose desired state names another release, and whose
//     desired state no admin signed after the statement that put it where
//     it is, gets it: one convergence rollout per target and sweep, run and
//     reported like any other.
//
// The newest admin statement about a device wins: a deploy straight to a
// device after its group's deploy stands until the device is moved,
// pinned or unpinned, or the group gets a new target.

// convergeEvery is how often the sweep runs even when nothing it watches
// changed (a claim freed by a finished rollout, a desired state deleted).
const convergeEvery = 30 * time.Second

// convergeMax bounds the devices one sweep takes up; the next sweep takes
// the rest.
const convergeMax = 2000

// state returns device id's index entry (nil when unknown or no index).
func (sn *snapshot) state(id string) *deviceState {
	if sn == nil {
		return nil
	}
	i, ok := slices.BinarySearchFunc(sn.devs, id, func(s *deviceState, id string) int { return strings.Compare(s.id(), id) })
	if !ok {
		return nil
	}
	return sn.devs[i]
}

// preview describes device d for a deploy preview; s may be nil.
func (s *deviceState) preview(sn *snapshot, d model.Device) model.PreviewDevice {
	p := model.PreviewDevice{ID: d.ID, Name: d.Name}
	if s == nil {
		return p
	}
	if s.facts != nil {
		p.Current = s.facts.CurrentSystem
	}
	p.LastSeen = s.lastSeen
	if s.rec != nil {
		p.Online = sn.isOnline(s)
	}
	return p
}

// want is what a device should run by its pin and groups.
type want struct {
	release string
	// target is the group target it follows ("" group for a pin).
	target *model.GroupTarget
	pin    *model.Pin
	// conflict names the groups that want different releases.
	conflict string
}

// wanted resolves rec's pin and groups against the groups' targets.
func (sn *snapshot) wanted(rec *model.Device) want {
	if rec.Pin != nil {
		return want{release: rec.Pin.ReleaseID, pin: rec.Pin}
	}
	var w want
	var parts []string
	split := false
	groups := slices.Clone(rec.Groups)
	slices.Sort(groups)
	for _, g := range groups {
		t := sn.targets[g]
		if t == nil {
			continue
		}
		parts = append(parts, g+"→"+t.ReleaseID)
		switch {
		case w.target == nil:
			w.target, w.release = t, t.ReleaseID
		case t.ReleaseID != w.release:
			split = true
		case t.SetAt.After(w.target.SetAt):
			w.target = t // the same release: carry the newer statement
		}
	}
	if split {
		return want{conflict: strings.Join(parts, ", ")}
	}
	return w
}

// conflict names rec's groups that want different releases ("" if none).
func (sn *snapshot) conflict(rec *model.Device) string {
	if rec.Pin != nil || len(rec.Groups) < 2 {
		return ""
	}
	return sn.wanted(rec).conflict
}

// member says where device s stands against group g's target t.
func (sn *snapshot) member(s *deviceState, t *model.GroupTarget) model.GroupMember {
	m := model.GroupMember{ID: s.rec.ID, Name: s.rec.Name, DesiredRelease: s.release}
	if s.facts != nil {
		m.CurrentSystem = s.facts.CurrentSystem
	}
	w := sn.wanted(s.rec)
	res, msg, _ := s.lastResult()
	failed := res == model.ResultFailed || res == model.ResultRolledBack
	switch {
	case w.pin != nil:
		m.State, m.Detail = model.MemberPinned, "pinned to "+w.pin.ReleaseID
	case w.conflict != "":
		m.State, m.Detail = model.MemberConflict, w.conflict
	case t == nil:
		m.State = model.MemberNoTarget
	case s.release == t.ReleaseID && s.desired != "" && m.CurrentSystem == s.desired:
		m.State = model.MemberOnTarget
	case s.release == t.ReleaseID && failed:
		m.State, m.Detail = model.MemberFailing, msg
	default:
		m.State = model.MemberBehind
		if s.release != t.ReleaseID && s.release != "" {
			m.Detail = "wants " + s.release
		}
	}
	return m
}

// groupRows summarises every group that has devices or a target.
func (sn *snapshot) groupRows() []model.GroupRow {
	rows := map[string]*model.GroupRow{}
	row := func(g string) *model.GroupRow {
		r := rows[g]
		if r == nil {
			r = &model.GroupRow{Group: g}
			if t := sn.targets[g]; t != nil {
				r.ReleaseID, r.RolloutID, r.SetAt = t.ReleaseID, t.RolloutID, t.SetAt
			}
			rows[g] = r
		}
		return r
	}
	for g := range sn.targets {
		row(g)
	}
	for _, s := range sn.devs {
		if !s.exported() || s.rec.Status != model.DeviceActive {
			continue
		}
		for _, g := range s.rec.Groups {
			r := row(g)
			r.Devices++
			countMember(r, sn.member(s, sn.targets[g]).State)
		}
	}
	out := make([]model.GroupRow, 0, len(rows))
	for _, r := range rows {
		out = append(out, *r)
	}
	slices.SortFunc(out, func(a, b model.GroupRow) int { return strings.Compare(a.Group, b.Group) })
	return out
}

func countMember(r *model.GroupRow, state string) {
	switch state {
	case model.MemberOnTarget:
		r.OnTarget++
	case model.MemberBehind:
		r.Behind++
	case model.MemberFailing:
		r.Failing++
	case model.MemberConflict:
		r.Conflicts++
	case model.MemberPinned:
		r.Pinned++
	}
}

// groupView is group g with every active member.
func (sn *snapshot) groupView(g string) (*model.GroupView, bool) {
	v := &model.GroupView{GroupRow: model.GroupRow{Group: g}, Members: []model.GroupMember{}}
	t := sn.targets[g]
	if t != nil {
		v.ReleaseID, v.RolloutID, v.SetAt = t.ReleaseID, t.RolloutID, t.SetAt
	}
	for _, s := range sn.devs {
		if !s.exported() || s.rec.Status != model.DeviceActive || !slices.Contains(s.rec.Groups, g) {
			continue
		}
		m := sn.member(s, t)
		v.Devices++
		countMember(&v.GroupRow, m.State)
		v.Members = append(v.Members, m)
	}
	slices.SortFunc(v.Members, func(a, b model.GroupMember) int {
		return cmp.Or(strings.Compare(a.Name, b.Name), strings.Compare(a.ID, b.ID))
	})
	return v, t != nil || v.Devices > 0
}

// The admin API of groups and pins.

func (s *services) groupsList(_ context.Context, _ *model.Admin, _ json.RawMessage) (any, error) {
	return s.c.index.snapshot().groupRows(), nil
}

func (s *services) groupShow(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.GroupRef
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	sn := s.c.index.snapshot()
	v, ok := sn.groupView(a.Group)
	if !ok {
		return nil, notFound("group %q has no devices and no target (see fleet-admin groups ls)", a.Group)
	}
	return v, nil
}

// devicePin holds a device on a release, or lets it follow its groups
// again. The signed request is kept: to the agent it is the deploy of
// that release to this device (pin), or the statement that lets it take
// its group's older target again (unpin).
func (s *services) devicePin(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	var a model.DevicePin
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	signed, err := signedFrom(ctx)
	if err != nil {
		return nil, err
	}
	if a.ReleaseID != "" {
		rel, _, err := s.c.rollouts.release(ctx, a.ReleaseID)
		if err != nil {
			return nil, err
		}
		d, err := s.resolveFor(ctx, who, a.Ref)
		if err != nil {
			return nil, err
		}
		if _, ok := rel.PathFor(d.Host()); !ok {
			return nil, badRequest("release %s has no closure for host %s", rel.ID, d.Name)
		}
	}
	at := s.now().UTC()
	if t := signed.time(); !t.IsZero() {
		at = t
	}
	d, err := s.updateDevice(ctx, a.Ref, func(d *model.Device) error {
		if err := mayTouch(who, d.Groups); err != nil {
			return err
		}
		if d.Status == model.DeviceRevoked {
			return conflict("device %s (%s) is revoked", d.ID, d.Name)
		}
		if a.ReleaseID == "" {
			if d.Pin == nil {
				return conflict("device %s (%s) is not pinned", d.ID, d.Name)
			}
			d.Pin = nil
			d.Statement = signed.s
			return nil
		}
		d.Pin = &model.Pin{ReleaseID: a.ReleaseID, At: at, By: who.Name, Statement: signed.s}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.c.rollouts.pokeConverge()
	return s.view(*d), nil
}

// signedReq is the signed request being served, decoded.
type signedReq struct {
	s   *model.Signed
	req *model.Request
}

func (r signedReq) time() time.Time {
	if r.req == nil {
		return time.Time{}
	}
	return r.req.Time
}

// signedFrom returns the request being served, which a statement kept
// for devices must be.
func signedFrom(ctx context.Context) (signedReq, error) {
	s := signedRequest(ctx)
	if s == nil {
		return signedReq{}, errors.New("no signed request in context")
	}
	var req model.Request
	if err := s.Decode(&req); err != nil {
		return signedReq{}, fmt.Errorf("decode the signed request: %w", err)
	}
	return signedReq{s: s, req: &req}, nil
}

// statementTime is when the admin signed s (zero if it cannot be read).
// The coordinator only orders statements by it; devices verify them.
func statementTime(s *model.Signed) time.Time {
	if s == nil {
		return time.Time{}
	}
	var req model.Request
	if s.Decode(&req) != nil {
		return time.Time{}
	}
	return req.Time
}

// desiredTime is the newest statement a desired state carries.
func desiredTime(d *model.Desired) time.Time {
	t := statementTime(d.Deploy)
	for _, s := range []*model.Signed{d.Join, d.Revert} {
		if u := statementTime(s); u.After(t) {
			t = u
		}
	}
	return t
}

// The engine's side: targets and convergence.

// pokeConverge asks the leader's sweep to run now (no-op elsewhere: the
// leader's index sees the change and runs it).
func (r *rollouts) pokeConverge() {
	select {
	case r.convergeKick <- struct{}{}:
	default:
	}
}

// syncTargets makes each group's stored target its newest succeeded
// rollout that sets one; a target whose rollout was undone falls back to
// the one before it, or goes.
func (r *rollouts) syncTargets(ctx context.Context, sn *snapshot) {
	byID := map[string]*model.Rollout{}
	newest := map[string]*model.Rollout{}
	for _, ro := range sn.rollouts {
		byID[ro.ID] = ro
		if !ro.SetsTarget || ro.Group == "" || ro.State != model.RolloutSucceeded {
			continue
		}
		if n := newest[ro.Group]; n == nil || ro.CreatedAt.After(n.CreatedAt) {
			newest[ro.Group] = ro
		}
	}
	groups := map[string]bool{}
	for g := range newest {
		groups[g] = true
	}
	for g := range sn.targets {
		groups[g] = true
	}
	for g := range groups {
		cur, cand := sn.targets[g], newest[g]
		if cur != nil && cur.RolloutID != "" {
			if ro := byID[cur.RolloutID]; ro != nil && ro.State == model.RolloutReverted {
				if cand == nil {
					if err := r.groups.Delete(ctx, g); err != nil {
						r.log.Warn().Err(err).Str("group", g).Msg("groups: clear an undone target")
					} else {
						r.log.Info().Str("group", g).Str("undone", cur.ReleaseID).Msg("group target cleared")
					}
					continue
				}
				cur = nil
			}
		}
		if cand == nil || cur != nil && (cur.RolloutID == cand.ID || !cand.CreatedAt.After(cur.SetAt)) {
			continue
		}
		t := model.GroupTarget{Group: g, ReleaseID: cand.ReleaseID, RolloutID: cand.ID, Deploy: cand.Request,
			SetAt: cand.CreatedAt, HealthTimeout: cand.HealthTimeout}
		if _, err := r.groups.Put(ctx, g, mustJSON(t)); err != nil {
			r.log.Warn().Err(err).Str("group", g).Msg("groups: record target")
			continue
		}
		r.log.Info().Str("group", g).Str("release", t.ReleaseID).Str("rollout", t.RolloutID).Msg("group target set")
	}
}

// notDue is what a device was found not due for convergence with.
type notDue struct {
	rec              *model.Device // index values are replaced, never changed
	rollout, release string
	target           *model.GroupTarget
	pin              *model.Pin
}

// convergeKey groups the devices one convergence rollout takes.
type convergeKey struct {
	release, group, pinOf string
}

// converge brings devices to their pin or group target (see the top of
// this file). It runs on the leader only.
func (r *rollouts) converge(ctx context.Context) {
	if r.index == nil || !r.index.CaughtUp() {
		return
	}
	sn := r.index.snapshot()
	r.syncTargets(ctx, sn)
	unfinished := map[string]bool{}
	for _, ro := range sn.rollouts {
		if !ro.State.Finished() {
			unfinished[ro.ID] = true
		}
	}
	plans := map[convergeKey][]*deviceState{}
	wants := map[convergeKey]want{}
	n := 0
	for _, s := range sn.devs {
		if n >= convergeMax {
			break
		}
		if !s.exported() || s.rec.Status != model.DeviceActive || s.rollout != "" && unfinished[s.rollout] {
			continue
		}
		w := sn.wanted(s.rec)
		if w.release == "" || w.conflict != "" || s.release == w.release {
			continue
		}
		// A device found not due stays so until its record, desired
		// state or target changes: the sweep does not read it again.
		nd := notDue{rec: s.rec, rollout: s.rollout, release: s.release, target: w.target, pin: w.pin}
		if r.notDue[s.rec.ID] == nd {
			continue
		}
		if due, settled := r.convergeDue(ctx, s, w, unfinished); !due {
			if settled {
				r.notDue[s.rec.ID] = nd
			}
			continue
		}
		delete(r.notDue, s.rec.ID)
		k := convergeKey{release: w.release}
		if w.pin != nil {
			k.pinOf = s.rec.ID // a pin's statement names its one device
		} else {
			k.group = w.target.Group
		}
		plans[k] = append(plans[k], s)
		wants[k] = w
		n++
	}
	keys := make([]convergeKey, 0, len(plans))
	for k := range plans {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b convergeKey) int {
		return cmp.Or(strings.Compare(a.group+a.pinOf, b.group+b.pinOf), strings.Compare(a.release, b.release))
	})
	for _, k := range keys {
		if err := r.createConverge(ctx, wants[k], plans[k]); err != nil {
			r.log.Warn().Err(err).Str("release", k.release).Str("group", k.group).Msg("converge")
		}
	}
}

// convergeDue reports whether device s should be brought to w now: it is
// not held by an unfinished rollout, and its desired state carries no
// admin statement newer than the one w rests on. settled says a "no"
// holds until the device's record, desired state or target changes (a
// claim is given back when its rollout ends, which changes neither).
func (r *rollouts) convergeDue(ctx context.Context, s *deviceState, w want, unfinished map[string]bool) (due, settled bool) {
	if e, err := r.claims.Get(ctx, s.rec.ID); err == nil {
		owner := string(e.Value())
		if unfinished[owner] {
			return false, false
		}
		if _, ok := r.index.rolloutOf(owner); !ok && time.Since(e.Created()) < orphanClaimAge {
			return false, false // a rollout being created right now
		}
	} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
		return false, false
	}
	if s.release == "" {
		return true, false
	}
	e, err := r.desired.Get(ctx, s.rec.ID)
	if err != nil {
		return errors.Is(err, jetstream.ErrKeyNotFound), false
	}
	var d model.Desired
	if json.Unmarshal(e.Value(), &d) != nil {
		return true, false // damaged: replace it
	}
	var basis time.Time
	if w.pin != nil {
		basis = statementTime(w.pin.Statement)
	} else {
		basis = statementTime(w.target.Deploy)
		if t := statementTime(s.rec.Statement); t.After(basis) {
			basis = t
		}
	}
	if desiredTime(&d).Before(basis) {
		return true, false
	}
	return false, true
}

// createConverge records one convergence rollout of devs to w.
func (r *rollouts) createConverge(ctx context.Context, w want, devs []*deviceState) error {
	rel, _, err := r.release(ctx, w.release)
	if err != nil {
		return err
	}
	now := time.Now().UTC()
	ro := &model.Rollout{
		ID: newRolloutID(now), Kind: model.KindConverge, ReleaseID: rel.ID, CreatedAt: now, UpdatedAt: now,
		CreatedBy: "coordinator", Strategy: model.StrategyAll, Batches: []model.Quantity{{Percent: 100}},
		// Each device stands alone: one that fails is reported, and holds
		// back nobody else.
		MaxFailures: model.Quantity{Percent: 100}, HealthTimeout: model.Duration(5 * time.Minute),
		OnFailure: model.OnFailurePause, State: model.RolloutPending, Counts: map[model.DeviceRolloutState]int{},
	}
	if w.pin != nil {
		ro.Request = w.pin.Statement
	} else {
		ro.Request, ro.Group = w.target.Deploy, w.target.Group
		if w.target.HealthTimeout > 0 {
			ro.HealthTimeout = w.target.HealthTimeout
		}
	}
	var rds []*model.RolloutDevice
	groups := map[string]bool{}
	for _, s := range devs {
		path, ok := rel.PathFor(s.rec.Host())
		if !ok {
			r.log.Debug().Str("device", s.rec.Name).Str("release", rel.ID).Msg("converge: the release has no closure for the host")
			continue
		}
		var prev json.RawMessage
		if e, err := r.desired.Get(ctx, s.rec.ID); err == nil && json.Valid(e.Value()) {
			prev = e.Value()
		}
		rds = append(rds, &model.RolloutDevice{Device: s.rec.ID, Name: s.rec.Name, State: model.DeviceQueued, StorePath: path, Previous: prev})
		for _, g := range s.rec.Groups {
			groups[g] = true
		}
	}
	if len(rds) == 0 {
		return nil
	}
	slices.SortFunc(rds, func(a, b *model.RolloutDevice) int { return strings.Compare(a.Name, b.Name) })
	for g := range groups {
		ro.Groups = append(ro.Groups, g)
	}
	slices.Sort(ro.Groups)
	ro.Total, ro.BatchSizes = len(rds), []int{len(rds)}
	ro.Counts[model.DeviceQueued] = len(rds)
	return r.record(ctx, ro, rds, nil, zerolog.Dict())
}

// convergeLoop runs the sweep while this coordinator leads: when the index
// saw a change, when asked, and every convergeEvery regardless.
func (r *rollouts) convergeLoop(ctx context.Context) {
	tick := time.NewTicker(convergeCheck)
	defer tick.Stop()
	var seen uint64
	var last time.Time
	r.notDue = map[string]notDue{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.convergeKick:
		case <-tick.C:
			if r.index == nil || r.index.changes.Load() == seen && time.Since(last) < convergeEvery {
				continue
			}
		}
		if r.index != nil {
			seen = r.index.changes.Load()
		}
		last = time.Now()
		r.converge(ctx)
	}
}

// convergeCheck is how often the sweep looks whether anything changed.
const convergeCheck = 2 * time.Second
