package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"fleet/model"
)

// Releases are immutable: created once with kv.Create, never overwritten,
// and always stored as the manifest its author signed.

func (s *services) releaseCreate(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	var signed model.Signed
	if err := decodeArgs(raw, &signed); err != nil {
		return nil, err
	}
	rel, err := model.VerifyRelease(&signed, nil)
	if err != nil {
		return nil, badRequest("%v", err)
	}
	// The requester signs its own releases: a manifest signed by someone
	// else is theirs to record.
	if signed.Signer != who.Key {
		return nil, refused("release %s is signed by %s, not by you (%s): sign releases with your own key", rel.ID, signed.Signer, who.Key)
	}
	b, _ := json.Marshal(signed)
	if _, err := s.c.rollouts.releases.Create(ctx, rel.ID, b); err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) {
			return nil, conflict("release %s already exists: releases are immutable, create one with a new --name", rel.ID)
		}
		return nil, fmt.Errorf("record release %s: %w", rel.ID, err)
	}
	return model.ReleaseView{Release: *rel, Signed: signed}, nil
}

func (s *services) releasesList(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	q, err := listQuery(raw)
	if err != nil {
		return nil, err
	}
	kv := s.c.rollouts.releases
	lister, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("list releases: %w", err)
	}
	out := []model.Release{}
	for k := range lister.Keys() {
		v, err := s.release(ctx, k)
		if err != nil {
			s.log.Warn().Err(err).Str("release", k).Msg("skipping unreadable release")
			continue
		}
		out = append(out, v.Release)
	}
	return pageOf(out, func(r *model.Release) string { return timeKey(r.CreatedAt, r.ID) }, q.Page, capList)
}

func (s *services) releaseShow(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.ReleaseRef
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	return s.release(ctx, strings.TrimSpace(a.ID))
}

func (s *services) release(ctx context.Context, id string) (*model.ReleaseView, error) {
	rel, signed, err := s.c.rollouts.release(ctx, id)
	if err != nil {
		return nil, err
	}
	return &model.ReleaseView{Release: *rel, Signed: *signed}, nil
}

// Rollout verbs.

func (s *services) deploy(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	req, err := s.deployRequest(ctx, who, raw)
	if err != nil {
		return nil, err
	}
	return s.c.rollouts.Create(ctx, req, who.Key, signedRequest(ctx))
}

// deployPreview is deploy --dry-run: the same checks, nothing written.
func (s *services) deployPreview(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	req, err := s.deployRequest(ctx, who, raw)
	if err != nil {
		return nil, err
	}
	return s.c.rollouts.Preview(ctx, req)
}

// deployRequest decodes a deploy and checks the admin may make it: an
// operator limited to groups deploys only inside them. Devices named by
// prefix or host name are resolved to their IDs.
func (s *services) deployRequest(ctx context.Context, who *model.Admin, raw json.RawMessage) (model.DeployRequest, error) {
	var req model.DeployRequest
	if err := decodeArgs(raw, &req); err != nil {
		return req, err
	}
	if req.Group != "" {
		if err := mayAssign(who, []string{req.Group}); err != nil {
			return req, err
		}
	}
	ids := make([]string, 0, len(req.Devices))
	for _, ref := range req.Devices {
		d, err := s.resolveFor(ctx, who, ref)
		if err != nil {
			return req, err
		}
		ids = append(ids, d.ID)
	}
	req.Devices = ids
	return req, nil
}

func (s *services) rolloutsList(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	q, err := listQuery(raw)
	if err != nil {
		return nil, err
	}
	list, err := s.c.rollouts.List(ctx)
	if err != nil {
		return nil, err
	}
	return pageOf(list, func(r **model.Rollout) string { return timeKey((*r).CreatedAt, (*r).ID) }, q.Page, capList)
}

// rolloutShow answers a rollout with one page of its progress rows (none
// with SummaryOnly).
func (s *services) rolloutShow(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.RolloutRef
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	ro, _, err := s.c.rollouts.Get(ctx, a.ID)
	if err != nil {
		return nil, err
	}
	v := model.RolloutView{Rollout: *ro, Progress: []model.RolloutProgress{}}
	if a.SummaryOnly {
		return v, nil
	}
	devs, err := s.c.rollouts.Devices(ctx, ro)
	if err != nil {
		return nil, err
	}
	rows := make([]model.RolloutProgress, len(devs))
	for i, d := range devs {
		rows[i] = d.Progress()
	}
	// Batch order, then name, as Devices sorts them.
	key := func(p *model.RolloutProgress) string {
		return fmt.Sprintf("%08d\x00%s\x00%s", p.Batch, p.Name, p.Device)
	}
	v.Progress, v.Next, err = pageSorted(rows, key, a.Page, capProgress)
	if err != nil {
		return nil, err
	}
	return v, nil
}

func (s *services) rolloutAction(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	var a model.RolloutRef
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	ro, _, err := s.c.rollouts.Get(ctx, a.ID)
	if err != nil {
		return nil, err
	}
	// An operator limited to groups acts only on rollouts within them.
	groups := ro.Groups
	if ro.Group != "" {
		groups = []string{ro.Group}
	}
	if err := mayAssign(who, groups); err != nil {
		return nil, err
	}
	return s.c.rollouts.Transition(ctx, a, signedRequest(ctx))
}
