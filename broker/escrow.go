package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"fleet/model"
	"fleet/subjects"
)

// Recovery-key escrow. An owner records the escrow public key in a signed
// statement (escrow init, escrow rotate); devices learn it from the
// coordinator, check the statement's signer against their trusted admin
// keys, seal each LUKS device's recovery key to it and send the sealed
// bytes signed with their key. fleet_escrow holds only those, under
// "<device>.<disk>"; fetching them (escrow get) is audited.

// escrowConfirmEvery bounds the writes of confirmations: an entry's
// confirmation time is refreshed at most this often.
const escrowConfirmEvery = 10 * time.Minute

func (s *services) escrowVerbs() []apiVerb {
	return []apiVerb{
		{subjects.VerbEscrowKey, true, subjects.RoleOwner, s.escrowKeySet},
		{subjects.VerbEscrowGet, true, subjects.RoleOwner, s.escrowGet},
		{subjects.VerbEscrow, false, subjects.RoleViewer, s.escrowList},
	}
}

func escrowKey(dev, disk string) string { return dev + "." + disk }

func (s *services) escrowKeySet(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	var st model.Signed
	if err := decodeArgs(raw, &st); err != nil {
		return nil, err
	}
	k, err := model.VerifyEscrowKey(&st, []string{who.Key})
	if err != nil {
		return nil, refused("%v: the statement must be signed by the admin who sends it", err)
	}
	if _, err := s.escrow.Put(ctx, subjects.EscrowKeyEntry, mustJSON(st)); err != nil {
		return nil, fmt.Errorf("store the escrow key: %w", err)
	}
	// Every active device re-seals to it; those offline do on reconnect
	// or on their timer.
	devs, err := readDevices(ctx, s.devices)
	if err == nil {
		for _, d := range devs {
			if d.Status == model.DeviceActive {
				_ = s.c.fc.Publish(subjects.DeviceEscrowNotify(siteOf(&d), d.ID), nil)
			}
		}
	}
	return k, nil
}

// currentEscrowKey returns the stored statement and its key ("" when none).
func (s *services) currentEscrowKey(ctx context.Context) (*model.Signed, string, error) {
	e, err := s.escrow.Get(ctx, subjects.EscrowKeyEntry)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, "", nil
	}
	if err != nil {
		return nil, "", fmt.Errorf("read the escrow key: %w", err)
	}
	var st model.Signed
	if err := json.Unmarshal(e.Value(), &st); err != nil {
		return nil, "", fmt.Errorf("the escrow key entry is damaged: %w", err)
	}
	k, err := model.VerifyEscrowKey(&st, nil)
	if err != nil {
		return nil, "", err
	}
	return &st, k.Key, nil
}

func (s *services) escrowEntries(ctx context.Context, filter string) ([]model.EscrowRecord, []*model.EscrowPut, error) {
	kl, err := s.escrow.ListKeysFiltered(ctx, filter)
	if err != nil {
		return nil, nil, fmt.Errorf("list escrow: %w", err)
	}
	var recs []model.EscrowRecord
	var puts []*model.EscrowPut
	for k := range kl.Keys() {
		if k == subjects.EscrowKeyEntry {
			continue
		}
		e, err := s.escrow.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("read escrow %s: %w", k, err)
		}
		var rec model.EscrowRecord
		var p model.EscrowPut
		if json.Unmarshal(e.Value(), &rec) != nil || rec.Signed.Decode(&p) != nil {
			s.log.Warn().Str("key", k).Msg("damaged escrow entry")
			continue
		}
		recs, puts = append(recs, rec), append(puts, &p)
	}
	return recs, puts, nil
}

func (s *services) escrowGet(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	var a model.EscrowGet
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	d, err := s.resolveFor(ctx, who, a.Ref)
	if err != nil {
		return nil, err
	}
	recs, puts, err := s.escrowEntries(ctx, d.ID+".>")
	if err != nil {
		return nil, err
	}
	out := []model.EscrowRecord{}
	for i, p := range puts {
		if a.Disk == "" || p.Disk == a.Disk {
			out = append(out, recs[i])
		}
	}
	if len(out) == 0 {
		return nil, notFound("nothing escrowed for device %s (%s)%s", d.ID, d.Name, map[bool]string{true: " disk " + a.Disk}[a.Disk != ""])
	}
	return out, nil
}

func (s *services) escrowList(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.DeviceList
	if len(raw) > 0 {
		if err := decodeArgs(raw, &a); err != nil {
			return nil, err
		}
	}
	_, cur, err := s.currentEscrowKey(ctx)
	if err != nil {
		return nil, err
	}
	recs, puts, err := s.escrowEntries(ctx, ">")
	if err != nil {
		return nil, err
	}
	devs, err := readDevices(ctx, s.devices)
	if err != nil {
		return nil, err
	}
	byID := map[string]model.Device{}
	for _, d := range devs {
		byID[d.ID] = d
	}
	out := []model.EscrowView{}
	have := map[string]bool{}
	for i, p := range puts {
		d, ok := byID[p.Device]
		if !ok || (a.Group != "" && !slices.Contains(d.Groups, a.Group)) {
			continue
		}
		v := model.EscrowView{Device: p.Device, Name: d.Name, Disk: p.Disk, State: "escrowed", EscrowKey: p.EscrowKey,
			EscrowedAt: recs[i].EscrowedAt, ConfirmedAt: recs[i].ConfirmedAt}
		if p.EscrowKey != cur {
			v.State = "stale_key"
		}
		have[escrowKey(p.Device, p.Disk)] = true
		out = append(out, v)
	}
	// LUKS devices the facts list with nothing escrowed.
	if x := s.c.index; x != nil {
		for _, d := range devs {
			if d.Status == model.DeviceRevoked || (a.Group != "" && !slices.Contains(d.Groups, a.Group)) {
				continue
			}
			f := x.latestFacts(d.ID)
			if f == nil {
				continue
			}
			for _, disk := range f.Encryption.LUKSDevices {
				if !have[escrowKey(d.ID, disk)] {
					out = append(out, model.EscrowView{Device: d.ID, Name: d.Name, Disk: disk, State: "missing"})
				}
			}
		}
	}
	sortByDevice(out, func(v *model.EscrowView) (string, string, string) { return v.Name, v.Device, v.Disk })
	return out, nil
}

// onEscrowSync takes a device's signed escrow request: stores its sealed
// keys (sealed to the current escrow key only), confirms what it escrowed
// before, and answers with the current escrow key statement, only into
// its own inbox.
func (s *services) onEscrowSync(m *nats.Msg) {
	id, ok := s.acceptDeviceRequest(m, subjects.EscrowPut, "escrow", func(msg string) any { return model.EscrowSyncReply{Error: msg} })
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := s.escrowSync(ctx, id, m.Data)
	if err != nil {
		s.drop("escrow", dropInvalid, m)
		r.Error = err.Error()
	}
	s.reply(m, r)
}

func (s *services) escrowSync(ctx context.Context, id string, data []byte) (model.EscrowSyncReply, error) {
	var r model.EscrowSyncReply
	req, err := parseDeviceRequest(data, id, "escrow", model.PurposeEscrowSync, 128<<10,
		func(q *model.EscrowSync) string { return q.Device })
	if err != nil {
		return r, err
	}
	if len(req.Puts) > 32 || len(req.Have) > 32 {
		return r, errors.New("escrow request: at most 32 disks")
	}
	st, cur, err := s.currentEscrowKey(ctx)
	if err != nil {
		return r, err
	}
	r.Key = st
	// Every put is checked before any is stored.
	puts := make([]*model.EscrowPut, len(req.Puts))
	for i := range req.Puts {
		p, err := model.CheckEscrowPut(&req.Puts[i], id)
		if err != nil {
			return r, err
		}
		if cur == "" || p.EscrowKey != cur {
			return r, fmt.Errorf("the recovery key of %s is sealed to %s, not to the current escrow key %q: seal it again", p.Disk, p.EscrowKey, cur)
		}
		puts[i] = p
	}
	now := s.now().UTC()
	for i, p := range puts {
		rec := model.EscrowRecord{Signed: req.Puts[i], EscrowedAt: now, ConfirmedAt: now}
		if _, err := s.escrow.Put(ctx, escrowKey(id, p.Disk), mustJSON(rec)); err != nil {
			return r, fmt.Errorf("store the recovery key of %s: %w", p.Disk, err)
		}
		s.log.Info().Str("device", id).Str("disk", p.Disk).Msg("recovery key escrowed")
	}
	for _, h := range req.Have {
		if model.CheckDisk(h.Disk) != nil {
			continue
		}
		e, err := s.escrow.Get(ctx, escrowKey(id, h.Disk))
		var rec model.EscrowRecord
		var p model.EscrowPut
		if err != nil || json.Unmarshal(e.Value(), &rec) != nil || rec.Signed.Decode(&p) != nil ||
			model.EscrowFingerprint(&p) != h.Fingerprint || p.EscrowKey != cur {
			if !errors.Is(err, jetstream.ErrKeyNotFound) && err != nil {
				return r, fmt.Errorf("read escrow of %s: %w", h.Disk, err)
			}
			r.Missing = append(r.Missing, h.Disk)
			continue
		}
		if now.Sub(rec.ConfirmedAt) < escrowConfirmEvery {
			continue
		}
		rec.ConfirmedAt = now
		if _, err := s.escrow.Update(ctx, e.Key(), mustJSON(rec), e.Revision()); err != nil {
			s.log.Debug().Err(err).Str("key", e.Key()).Msg("escrow confirmation not recorded")
		}
	}
	return r, nil
}
