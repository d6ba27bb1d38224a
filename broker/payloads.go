package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"fleet/model"
	"fleet/subjects"
)

// Sealed payloads. fleet-admin seals each file to the device's xkey and
// signs it; the coordinator checks the signer is the admin who asks (and
// may act on the device) and the size, stores the sealed document in
// fleet_payloads under "<device>.<name>", and nudges the device. The
// device asks for its payloads with a request signed by its key, saying
// what it holds (the delivery state payload ls shows); the answer goes
// only into its own inbox and carries only its own payloads.

func (s *services) payloadVerbs() []apiVerb {
	return []apiVerb{
		{subjects.VerbPayloadPush, true, subjects.RoleOperator, s.payloadPush},
		{subjects.VerbPayloadRemove, true, subjects.RoleOperator, s.payloadRemove},
		{subjects.VerbPayloads, false, subjects.RoleViewer, s.payloadsList},
	}
}

// maxSignedPayload bounds a signed payload document: the sealed bytes in
// base64 and their attributes.
const maxSignedPayload = model.MaxPayloadBytes*4/3 + 4096

func payloadKey(dev, name string) string { return dev + "." + name }

func (s *services) payloadPush(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	var a model.PayloadPush
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	if len(a.Payloads) == 0 {
		return nil, badRequest("no payloads: name a device (--device) or a group (--group) with devices")
	}
	if len(a.Payloads) > model.MaxCommands {
		return nil, badRequest("%d payloads in one request, at most %d: send them in parts", len(a.Payloads), model.MaxCommands)
	}
	// Everything is checked before anything is written.
	type item struct {
		p   *model.Payload
		s   model.Signed
		dev *model.Device
	}
	var items []item
	seen := map[string]bool{}
	for i := range a.Payloads {
		sp := a.Payloads[i]
		if len(sp.Payload) > maxSignedPayload {
			return nil, badRequest("payload %d is %d bytes signed and sealed, more than a %d-byte file can make: the limit is %d bytes a file",
				i+1, len(sp.Payload), maxSignedPayload, model.MaxPayloadBytes)
		}
		var claimed model.Payload
		if err := sp.Decode(&claimed); err != nil {
			return nil, badRequest("payload %d: %v", i+1, err)
		}
		p, err := model.CheckPayload(&sp, claimed.Device, []string{who.Key})
		switch {
		case errors.Is(err, model.ErrPayloadTooLarge):
			return nil, badRequest("%v", err)
		case errors.Is(err, model.ErrBadSignature), errors.Is(err, model.ErrUnknownSigner), errors.Is(err, model.ErrUnsigned):
			return nil, refused("payload %d (%s for %s): %v: every payload must be signed by the admin who sends it", i+1, claimed.Name, claimed.Device, err)
		case err != nil:
			return nil, badRequest("payload %d: %v", i+1, err)
		}
		k := payloadKey(p.Device, p.Name)
		if seen[k] {
			return nil, badRequest("payload %s is named twice for device %s", p.Name, p.Device)
		}
		seen[k] = true
		d, _, err := s.getDevice(ctx, p.Device)
		if err != nil {
			return nil, err
		}
		if d.Status == model.DeviceRevoked {
			return nil, badRequest("device %s (%s) is revoked: it gets no payloads", d.ID, d.Name)
		}
		if err := mayTouch(who, d.Groups); err != nil {
			return nil, err
		}
		items = append(items, item{p, sp, d})
	}
	out := make([]model.PayloadView, 0, len(items))
	for _, it := range items {
		rec := model.PayloadRecord{Signed: it.s, PushedBy: who.Name, PushedAt: s.now().UTC()}
		if _, err := s.payloads.Put(ctx, payloadKey(it.p.Device, it.p.Name), mustJSON(rec)); err != nil {
			return nil, fmt.Errorf("store payload %s for %s: %w", it.p.Name, it.p.Device, err)
		}
		// Known here before the device is told, whatever the watch's lag.
		s.payloadKeys.set(payloadKey(it.p.Device, it.p.Name), true)
		out = append(out, payloadView(it.dev, it.p, &rec))
	}
	for _, it := range items {
		s.notifyPayloads(it.dev)
	}
	return out, nil
}

func (s *services) notifyPayloads(d *model.Device) {
	if d.Status == model.DeviceActive {
		_ = s.c.fc.Publish(subjects.DevicePayloadsNotify(siteOf(d), d.ID), nil)
	}
}

func payloadView(d *model.Device, p *model.Payload, rec *model.PayloadRecord) model.PayloadView {
	v := model.PayloadView{
		Device: p.Device, Name: p.Name, SHA256: p.SHA256, Size: p.Size, Mode: p.Mode, Owner: p.Owner,
		Reload: p.Reload, NotAfter: p.NotAfter, PushedBy: rec.PushedBy, PushedAt: rec.PushedAt,
		DeliveredAt: rec.DeliveredAt, Error: rec.Error, State: "pending",
	}
	if d != nil {
		v.DeviceName = d.Name
	}
	switch {
	case rec.Error != "":
		v.State = "failed"
	case rec.Delivered == p.SHA256:
		v.State = "delivered"
	}
	return v
}

// payloadKeys knows which payload keys each device has, from a watch of
// the bucket's keys: most devices have none, and their syncs (every agent
// asks at start and on its re-check) then cost no JetStream request.
type payloadKeys struct {
	mu     sync.RWMutex
	ready  bool // the watch delivered the keys there were at start
	keys   map[string]map[string]bool
	cancel context.CancelFunc
}

// watchPayloadKeys starts the watch that keeps s.payloadKeys.
func (s *services) watchPayloadKeys() error {
	ctx, cancel := context.WithCancel(context.Background())
	w, err := s.payloads.WatchAll(ctx, jetstream.MetaOnly())
	if err != nil {
		cancel()
		return fmt.Errorf("watch %s: %w", subjects.BucketPayloads, err)
	}
	pk := &payloadKeys{keys: map[string]map[string]bool{}, cancel: cancel}
	s.payloadKeys = pk
	go followKV(ctx, w, pk.apply)
	return nil
}

func (pk *payloadKeys) apply(e jetstream.KeyValueEntry) {
	if e == nil {
		pk.mu.Lock()
		pk.ready = true
		pk.mu.Unlock()
		return
	}
	pk.set(e.Key(), e.Operation() == jetstream.KeyValuePut)
}

// set records that key exists (or not). The coordinator that writes a
// payload sets it at once; the watch brings every coordinator's in line.
func (pk *payloadKeys) set(key string, exists bool) {
	if pk == nil {
		return
	}
	dev, _, ok := strings.Cut(key, ".")
	if !ok {
		return
	}
	pk.mu.Lock()
	defer pk.mu.Unlock()
	if !exists {
		delete(pk.keys[dev], key)
		if len(pk.keys[dev]) == 0 {
			delete(pk.keys, dev)
		}
		return
	}
	if pk.keys[dev] == nil {
		pk.keys[dev] = map[string]bool{}
	}
	pk.keys[dev][key] = true
}

// of returns device dev's payload keys, or false before the watch has
// caught up.
func (pk *payloadKeys) of(dev string) ([]string, bool) {
	if pk == nil {
		return nil, false
	}
	pk.mu.RLock()
	defer pk.mu.RUnlock()
	if !pk.ready {
		return nil, false
	}
	out := make([]string, 0, len(pk.keys[dev]))
	for k := range pk.keys[dev] {
		out = append(out, k)
	}
	slices.Sort(out)
	return out, true
}

func (pk *payloadKeys) stop() {
	if pk != nil {
		pk.cancel()
	}
}

// devicePayloadEntries reads device id's payload records: the keys from
// memory once the watch has caught up, else listed from the bucket.
func (s *services) devicePayloadEntries(ctx context.Context, id string) ([]jetstream.KeyValueEntry, error) {
	keys, ok := s.payloadKeys.of(id)
	if !ok {
		return s.payloadEntries(ctx, id+".*")
	}
	var out []jetstream.KeyValueEntry
	var err error
	for _, k := range keys {
		if out, err = s.appendPayload(ctx, out, k); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// appendPayload appends the record under key k to out; a record removed
// meanwhile is passed over.
func (s *services) appendPayload(ctx context.Context, out []jetstream.KeyValueEntry, k string) ([]jetstream.KeyValueEntry, error) {
	e, err := s.payloads.Get(ctx, k)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return out, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read payload %s: %w", k, err)
	}
	return append(out, e), nil
}

// payloadEntries reads the records whose keys match filter.
func (s *services) payloadEntries(ctx context.Context, filter string) ([]jetstream.KeyValueEntry, error) {
	kl, err := s.payloads.ListKeysFiltered(ctx, filter)
	if err != nil {
		return nil, fmt.Errorf("list payloads: %w", err)
	}
	var out []jetstream.KeyValueEntry
	for k := range kl.Keys() {
		if out, err = s.appendPayload(ctx, out, k); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func decodePayloadRecord(e jetstream.KeyValueEntry) (*model.PayloadRecord, *model.Payload, error) {
	var rec model.PayloadRecord
	if err := json.Unmarshal(e.Value(), &rec); err != nil {
		return nil, nil, fmt.Errorf("payload record %s is damaged: %w", e.Key(), err)
	}
	var p model.Payload
	if err := rec.Signed.Decode(&p); err != nil {
		return nil, nil, fmt.Errorf("payload record %s: %w", e.Key(), err)
	}
	return &rec, &p, nil
}

func (s *services) payloadRemove(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	var a model.PayloadRemove
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	if err := model.CheckPayloadName(a.Name); err != nil {
		return nil, badRequest("%v", err)
	}
	var keys []string
	if len(a.Devices) == 0 {
		es, err := s.payloadEntries(ctx, "*."+a.Name)
		if err != nil {
			return nil, err
		}
		for _, e := range es {
			keys = append(keys, e.Key())
		}
	}
	for _, id := range a.Devices {
		if err := subjects.CheckDeviceID(id); err != nil {
			return nil, badRequest("%v", err)
		}
		keys = append(keys, payloadKey(id, a.Name))
	}
	var es []jetstream.KeyValueEntry
	for _, k := range keys {
		var err error
		if es, err = s.appendPayload(ctx, es, k); err != nil {
			return nil, err
		}
	}
	var removed []model.PayloadView
	var devs []*model.Device
	for _, e := range es {
		rec, p, err := decodePayloadRecord(e)
		if err != nil {
			return nil, err
		}
		d, _ := s.knownDevice(ctx, p.Device)
		if d != nil {
			if err := mayTouch(who, d.Groups); err != nil {
				return nil, err
			}
			devs = append(devs, d)
		}
		removed = append(removed, payloadView(d, p, rec))
	}
	if len(removed) == 0 {
		return nil, notFound("no device has payload %s", a.Name)
	}
	for _, v := range removed {
		// Purge: no revision of the sealed document stays behind.
		if err := s.payloads.Purge(ctx, payloadKey(v.Device, v.Name)); err != nil {
			return nil, fmt.Errorf("remove payload %s from %s: %w", v.Name, v.Device, err)
		}
		s.payloadKeys.set(payloadKey(v.Device, v.Name), false)
	}
	for _, d := range devs {
		s.notifyPayloads(d)
	}
	return removed, nil
}

func (s *services) payloadsList(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.PayloadQuery
	if len(raw) > 0 {
		if err := decodeArgs(raw, &a); err != nil {
			return nil, err
		}
	}
	filter := ">"
	if a.Name != "" {
		if err := model.CheckPayloadName(a.Name); err != nil {
			return nil, badRequest("%v", err)
		}
		filter = "*." + a.Name
	}
	es, err := s.payloadEntries(ctx, filter)
	if err != nil {
		return nil, err
	}
	out := []model.PayloadView{}
	for _, e := range es {
		rec, p, err := decodePayloadRecord(e)
		if err != nil {
			s.log.Warn().Err(err).Msg("payloads")
			continue
		}
		d, _ := s.knownDevice(ctx, p.Device)
		if a.Group != "" && (d == nil || !slices.Contains(d.Groups, a.Group)) {
			continue
		}
		out = append(out, payloadView(d, p, rec))
	}
	sortByDevice(out, func(v *model.PayloadView) (string, string, string) { return v.DeviceName, v.Device, v.Name })
	return out, nil
}

// onPayloadSync answers a device's signed request for its payloads, only
// into its own inbox, and records what it says it holds.
func (s *services) onPayloadSync(m *nats.Msg) {
	id, ok := s.acceptDeviceRequest(m, subjects.PayloadSync, "payloads", func(msg string) any { return model.PayloadSyncReply{Error: msg} })
	if !ok {
		return
	}
	req, err := parsePayloadSync(m.Data, id)
	if err != nil {
		s.drop("payloads", dropInvalid, m)
		s.reply(m, model.PayloadSyncReply{Error: err.Error()})
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	es, err := s.devicePayloadEntries(ctx, id)
	if err != nil {
		s.reply(m, model.PayloadSyncReply{Error: err.Error()})
		return
	}
	have := map[string]model.PayloadHave{}
	for _, h := range req.Have {
		have[h.Name] = h
	}
	r := model.PayloadSyncReply{Payloads: []model.Signed{}}
	for _, e := range es {
		rec, p, err := decodePayloadRecord(e)
		if err != nil || p.Device != id {
			continue
		}
		r.Payloads = append(r.Payloads, rec.Signed)
		h, ok := have[p.Name]
		if !ok || (h.SHA256 == rec.Delivered && model.CleanText(h.Error) == rec.Error) {
			continue
		}
		// Only a change is written; a lost race is taken up next time.
		rec.Delivered, rec.Error = h.SHA256, model.CleanText(h.Error)
		if len(rec.Error) > 512 {
			rec.Error = rec.Error[:512]
		}
		rec.DeliveredAt = s.now().UTC()
		if _, err := s.payloads.Update(ctx, e.Key(), mustJSON(rec), e.Revision()); err != nil {
			s.log.Debug().Err(err).Str("key", e.Key()).Msg("payload delivery state not recorded")
		}
	}
	s.reply(m, r)
}

func parsePayloadSync(b []byte, id string) (*model.PayloadSync, error) {
	r, err := parseDeviceRequest(b, id, "payload", model.PurposePayloadSync, 64<<10,
		func(q *model.PayloadSync) string { return q.Device })
	if err != nil {
		return nil, err
	}
	for _, h := range r.Have {
		if model.CheckPayloadName(h.Name) != nil || len(h.SHA256) > 64 || strings.ContainsAny(h.SHA256, " \n") {
			return nil, fmt.Errorf("payload request: bad entry %q", h.Name)
		}
	}
	return r, nil
}

// reply answers a device request into its (checked) reply inbox.
func (s *services) reply(m *nats.Msg, v any) {
	if m.Reply == "" {
		return
	}
	_ = m.Respond(mustJSON(v))
}
