package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"fleet/model"
	"fleet/subjects"
)

func (s *services) view(d model.Device) model.DeviceView {
	// The signed statements are for the device (kilobytes each): a view
	// names the pin, not its signature.
	d.Statement = nil
	if d.Pin != nil {
		p := *d.Pin
		p.Statement = nil
		d.Pin = &p
	}
	return model.DeviceView{Device: d, Online: s.presence.Online(d.ID), LastSeen: s.presence.LastSeen(d.ID)}
}

// readDevices reads every device record of the fleet_devices bucket kv.
func readDevices(ctx context.Context, kv jetstream.KeyValue) ([]model.Device, error) {
	var out []model.Device
	err := eachKey(ctx, kv, func(e jetstream.KeyValueEntry) {
		var d model.Device
		if json.Unmarshal(e.Value(), &d) == nil {
			out = append(out, d)
		}
	})
	return out, err
}

func (s *services) devicesList(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.DeviceList
	if len(raw) > 0 {
		if err := decodeArgs(raw, &a); err != nil {
			return nil, err
		}
	}
	all, err := readDevices(ctx, s.devices)
	if err != nil {
		return nil, err
	}
	var out []model.DeviceView
	for _, d := range all {
		if a.Group == "" || slices.Contains(d.Groups, a.Group) {
			out = append(out, s.view(d))
		}
	}
	return pageOf(out, func(d *model.DeviceView) string { return d.Name + "\x00" + d.ID }, a.Page, capDevices)
}

// resolveFor resolves ref as resolve does, for an admin who must be
// allowed to touch the device (its groups within the admin's).
func (s *services) resolveFor(ctx context.Context, who *model.Admin, ref string) (*model.Device, error) {
	d, err := s.resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	if err := mayTouch(who, d.Groups); err != nil {
		return nil, err
	}
	return d, nil
}

// resolve finds a device by full ID, unique ID prefix or unique name.
func (s *services) resolve(ctx context.Context, ref string) (*model.Device, error) {
	ref = strings.TrimSpace(ref)
	if ref == "" {
		return nil, badRequest("name a device by ID, ID prefix or host name")
	}
	if subjects.ValidDeviceID(ref) {
		d, _, err := s.getDevice(ctx, ref)
		return d, err
	}
	all, err := readDevices(ctx, s.devices)
	if err != nil {
		return nil, err
	}
	var byName, byPrefix []model.Device
	for _, d := range all {
		if d.Name == ref {
			byName = append(byName, d)
		} else if strings.HasPrefix(d.ID, ref) {
			byPrefix = append(byPrefix, d)
		}
	}
	// An exact name wins over a prefix that happens to match an ID.
	cands := byName
	if len(cands) == 0 {
		cands = byPrefix
	}
	switch len(cands) {
	case 0:
		return nil, notFound("no device matches %q (see fleet-admin devices ls)", ref)
	case 1:
		return &cands[0], nil
	}
	list := make([]string, len(cands))
	for i, d := range cands {
		list[i] = d.ID + " (" + d.Name + ")"
	}
	return nil, conflict("%q matches %d devices: %s; give the full ID", ref, len(cands), strings.Join(list, ", "))
}

func (s *services) getDevice(ctx context.Context, id string) (*model.Device, uint64, error) {
	e, err := s.devices.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, notFound("no device %s (see fleet-admin devices ls)", id)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("read device %s: %w", id, err)
	}
	var d model.Device
	if err := json.Unmarshal(e.Value(), &d); err != nil {
		return nil, 0, fmt.Errorf("device record %s is damaged: %w", id, err)
	}
	return &d, e.Revision(), nil
}

// updateDevice applies fn to the device ref names, with a revision check.
func (s *services) updateDevice(ctx context.Context, ref string, fn func(*model.Device) error) (*model.Device, error) {
	d, err := s.resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	for range 20 {
		cur, rev, err := s.getDevice(ctx, d.ID)
		if err != nil {
			return nil, err
		}
		if err := fn(cur); err != nil {
			return nil, err
		}
		b, _ := json.Marshal(cur)
		if _, err := s.devices.Update(ctx, cur.ID, b, rev); err == nil {
			return cur, nil
		} else if !errors.Is(err, jetstream.ErrKeyExists) {
			return nil, fmt.Errorf("write device %s: %w", cur.ID, err)
		}
	}
	return nil, &apiError{model.CodeInternal, "device " + d.ID + " is busy; retry"}
}

// mayTouch enforces an operator's group limit: it may change only devices
// in its groups, and only into its groups.
func mayTouch(who *model.Admin, groups []string) error {
	if who.Role == string(subjects.RoleOwner) || len(who.Groups) == 0 {
		return nil
	}
	if !slices.ContainsFunc(groups, func(g string) bool { return slices.Contains(who.Groups, g) }) {
		return refused("admin %s may act only on devices of groups %s", who.Name, strings.Join(who.Groups, ","))
	}
	return nil
}

// mayAssign: an operator limited to groups may give a device only those.
func mayAssign(who *model.Admin, groups []string) error {
	if who.Role == string(subjects.RoleOwner) || len(who.Groups) == 0 {
		return nil
	}
	for _, g := range groups {
		if !slices.Contains(who.Groups, g) {
			return refused("admin %s may not assign group %s (only %s)", who.Name, g, strings.Join(who.Groups, ","))
		}
	}
	return nil
}

func (s *services) deviceShow(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.DeviceRef
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	d, err := s.resolve(ctx, a.Ref)
	if err != nil {
		return nil, err
	}
	v := s.view(*d)
	v.Facts = s.c.index.latestFacts(d.ID)
	return v, nil
}

func (s *services) status(_ context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var q model.StatusQuery
	if len(raw) > 0 {
		if err := decodeArgs(raw, &q); err != nil {
			return nil, err
		}
	}
	rep := s.statusFor(q.Group, q.Page.After != "")
	rows, next, err := pageSorted(rep.Devices, func(r *model.DeviceStatusRow) string { return r.ID }, q.Page, capStatus)
	if err != nil {
		return nil, err
	}
	rep.Devices, rep.Next = rows, next
	return rep, nil
}

// statusReuse is how long a status report serves the pages after its
// first: a client reading a big fleet's pages one after another gets them
// from one pass over the index (the cursors keep pages consistent either
// way), while a new listing always starts from the index as it is.
const statusReuse = 2 * time.Second

// statusFor returns group's status report: the one built for the first
// page, for a later page of the same listing while it is fresh.
func (s *services) statusFor(group string, later bool) model.StatusReport {
	s.statusMu.Lock()
	defer s.statusMu.Unlock()
	if later && s.statusRep != nil && s.statusRep.Group == group && s.now().Sub(s.statusAt) < statusReuse {
		return *s.statusRep
	}
	rep := s.c.Status(group)
	s.statusRep, s.statusAt = &rep, s.now()
	return rep
}

func (s *services) facts(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var q model.FactsQuery
	if err := decodeArgs(raw, &q); err != nil {
		return nil, err
	}
	if q.Since <= 0 {
		return nil, badRequest("--since must be a positive duration, e.g. 24h")
	}
	after, err := decodeSeqCursor(q.Page.After)
	if err != nil {
		return nil, err
	}
	d, err := s.resolve(ctx, q.Ref)
	if err != nil {
		return nil, err
	}
	facts, last, more, err := s.c.FactsPage(ctx, d.ID, q.Since, after, pageLimit(q.Page, capFacts))
	if err != nil {
		return nil, err
	}
	p := &model.PageOf[model.Facts]{Items: facts, Total: -1}
	if more {
		p.Next = seqCursor(last)
	}
	return p, nil
}

func (s *services) deviceApprove(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	var a model.DeviceRef
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	d, err := s.updateDevice(ctx, a.Ref, func(d *model.Device) error {
		if err := mayTouch(who, d.Groups); err != nil {
			return err
		}
		switch d.Status {
		case model.DeviceRevoked:
			return conflict("device %s (%s) is revoked; it must enrol again with a new key and token", d.ID, d.Name)
		case model.DevicePending:
			d.Status = model.DeviceActive
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return s.view(*d), nil
}

func (s *services) deviceRevoke(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	var a model.DeviceRef
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	d, err := s.resolveFor(ctx, who, a.Ref)
	if err != nil {
		return nil, err
	}
	// Revoke the key first: the record says revoked only once the server
	// refuses the device, and a retry after a failure revokes again.
	if err := s.c.Revoke(ctx, d.ID); err != nil {
		return nil, fmt.Errorf("revoke device %s: %w", d.ID, err)
	}
	d, err = s.updateDevice(ctx, d.ID, func(d *model.Device) error {
		if d.Status != model.DeviceRevoked {
			d.Status = model.DeviceRevoked
			d.RevokedAt = s.now().UTC()
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	// Nothing waits for a revoked device: no desired state, no rollout.
	if err := s.c.rollouts.desired.Delete(ctx, d.ID); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, fmt.Errorf("clear desired state of %s: %w", d.ID, err)
	}
	if err := s.c.rollouts.DeviceGone(ctx, d.ID, "device revoked"); err != nil {
		return nil, err
	}
	return s.view(*d), nil
}

func (s *services) deviceGroups(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	var a model.DeviceGroups
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	if err := checkGroups(a.Groups); err != nil {
		return nil, err
	}
	groups := slices.Clone(a.Groups)
	slices.Sort(groups)
	groups = slices.Compact(groups)
	// The signed request is kept: it is what lets the device take its new
	// group's target, signed by an older deploy (Desired.Join).
	signed, err := signedFrom(ctx)
	if err != nil {
		return nil, err
	}
	d, err := s.updateDevice(ctx, a.Ref, func(d *model.Device) error {
		if err := mayTouch(who, d.Groups); err != nil {
			return err
		}
		if err := mayAssign(who, groups); err != nil {
			return err
		}
		if d.Status == model.DeviceRevoked {
			return conflict("device %s (%s) is revoked", d.ID, d.Name)
		}
		d.Groups = groups
		d.Statement = signed.s
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.c.rollouts.pokeConverge()
	return s.view(*d), nil
}
