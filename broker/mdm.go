package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"fleet/model"
	"fleet/subjects"
)

// The MDM duties' verbs (remote commands, sealed payloads, recovery-key
// escrow, encryption status), added to the admin API by startAPI.
func (s *services) mdmVerbs() []apiVerb {
	v := []apiVerb{s.commandVerb(), {subjects.VerbEncryption, false, subjects.RoleViewer, s.encryptionList}}
	return append(append(v, s.payloadVerbs()...), s.escrowVerbs()...)
}

// startMDM opens the MDM buckets and subscribes the device-facing MDM
// handlers, in the coordinators' queue group.
func (s *services) startMDM() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var err error
	if s.payloads, err = s.c.js.KeyValue(ctx, subjects.BucketPayloads); err != nil {
		return fmt.Errorf("bucket %s: %w", subjects.BucketPayloads, err)
	}
	if s.escrow, err = s.c.js.KeyValue(ctx, subjects.BucketEscrow); err != nil {
		return fmt.Errorf("bucket %s: %w", subjects.BucketEscrow, err)
	}
	if err := s.watchPayloadKeys(); err != nil {
		return err
	}
	for subj, h := range map[string]nats.MsgHandler{
		subjects.AllPayloadSync: s.onPayloadSync,
		subjects.AllEscrowPut:   s.onEscrowSync,
	} {
		if err := s.subscribeLanes(subj, false, s.pooled(func(_ *lane, m *nats.Msg) { h(m) })); err != nil {
			return err
		}
	}
	return nil
}

// acceptDeviceRequest takes the steps every signed MDM request of a
// device (under subject prefix) goes through before its own work: it must
// ask for an answer, come from a known, active device with a reply inbox
// of that device's own, and keep within the device's rate limit, else it
// is answered with refuse's reply (no work is done for a device that
// floods). It returns the device's ID, or false when the request was
// dropped; handler names it in the drop counter.
func (s *services) acceptDeviceRequest(m *nats.Msg, prefix, handler string, refuse func(msg string) any) (string, bool) {
	id, ok := subjects.DeviceFromRequest(prefix, m.Subject)
	if m.Reply == "" {
		s.drop(handler, dropInvalid, m)
		return "", false
	}
	if s.deviceFor(handler, m, id, ok) == nil {
		return "", false
	}
	if !s.allowReport(id, len(m.Data)) {
		s.drop(handler, dropRate, m)
		s.reply(m, refuse("too many requests: slow down"))
		return "", false
	}
	return id, true
}

// parseDeviceRequest checks the body of device id's signed request: at
// most limit bytes, signed by the device itself for purpose, and naming
// that device (device returns the ID the request names), so a device
// cannot pass another's request off as its own. what names the request in
// errors ("payload", "escrow").
func parseDeviceRequest[T any](b []byte, id, what, purpose string, limit int, device func(*T) string) (*T, error) {
	if len(b) > limit {
		return nil, errors.New(what + " request too large")
	}
	var sg model.Signed
	if err := json.Unmarshal(b, &sg); err != nil {
		return nil, fmt.Errorf("not a signed request: %w", err)
	}
	if err := sg.Verify(purpose, []string{id}); err != nil {
		return nil, fmt.Errorf("%s request signature: %w", what, err)
	}
	var r T
	if err := sg.Decode(&r); err != nil {
		return nil, err
	}
	if dev := device(&r); dev != id {
		return nil, fmt.Errorf("%s request names device %q, not its signer %s", what, dev, id)
	}
	return &r, nil
}

// sortByDevice orders a per-device listing by device name, then by device
// ID and item (key gives the three of a view), as the admin reads it.
func sortByDevice[T any](out []T, key func(*T) (name, id, item string)) {
	sort.Slice(out, func(i, j int) bool {
		ni, ii, ti := key(&out[i])
		nj, ij, tj := key(&out[j])
		if ni != nj {
			return ni < nj
		}
		return ii+ti < ij+tj
	})
}

// encryptionViews is every recorded, not revoked device's encryption
// state, from the index.
func (s *services) encryptionViews(group string) []model.EncryptionView {
	out := []model.EncryptionView{}
	x := s.c.index
	if x == nil {
		return out
	}
	for _, d := range x.snapshot().devs {
		if !d.exported() || (group != "" && !slices.Contains(d.rec.Groups, group)) {
			continue
		}
		v := model.EncryptionView{Device: d.rec.ID, Name: d.rec.Name, Groups: d.rec.Groups}
		if s.presence != nil {
			v.Online = s.presence.Online(d.rec.ID)
		}
		if f := d.facts; f != nil {
			v.RootEncrypted, v.LUKSDevices, v.FactsAt = f.Encryption.RootEncrypted, f.Encryption.LUKSDevices, f.Time
		}
		out = append(out, v)
	}
	return out
}

func (s *services) encryptionList(_ context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.DeviceList
	if len(raw) > 0 {
		if err := decodeArgs(raw, &a); err != nil {
			return nil, err
		}
	}
	return s.encryptionViews(a.Group), nil
}

// mdmCollector exports the MDM state: certificate expiry of payloads and
// when each escrowed recovery key was last confirmed. Bucket reads are cached for
// mdmMetricsTTL, so scrapes stay cheap.
type mdmCollector struct {
	s *services

	mu      sync.Mutex
	at      time.Time
	seqs    [2]uint64 // the buckets' last sequences when read
	expiry  []prometheus.Metric
	confirm []prometheus.Metric
}

const mdmMetricsTTL = 30 * time.Second

var (
	descCertExpiry = prometheus.NewDesc("fleet_payload_cert_expiry_timestamp_seconds",
		"Expiry of the certificate a sealed payload holds, per device and payload.", []string{"device", "name", "payload"}, nil)
	descEscrow = prometheus.NewDesc("fleet_escrow_confirmed_timestamp_seconds",
		"When the device last confirmed the escrowed recovery key of a disk.", []string{"device", "name", "disk"}, nil)
)

// newMDMCollector returns the coordinator's MDM metrics.
func (c *Coordinator) newMDMCollector() prometheus.Collector { return &mdmCollector{s: c.svc} }

func (m *mdmCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descCertExpiry
	ch <- descEscrow
}

func (m *mdmCollector) Collect(ch chan<- prometheus.Metric) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if seqs := m.bucketSeqs(); seqs != m.seqs || time.Since(m.at) > mdmMetricsTTL {
		m.refresh()
		m.seqs = seqs
	}
	for _, x := range m.expiry {
		ch <- x
	}
	for _, x := range m.confirm {
		ch <- x
	}
}

// bucketSeqs are the last sequences of the payload and escrow buckets: a
// write since the last read refreshes the cache at once.
func (m *mdmCollector) bucketSeqs() [2]uint64 {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var out [2]uint64
	for i, kv := range []jetstream.KeyValue{m.s.payloads, m.s.escrow} {
		if kv == nil {
			continue
		}
		if st, err := kv.Status(ctx); err == nil {
			if bs, ok := st.(*jetstream.KeyValueBucketStatus); ok {
				out[i] = bs.StreamInfo().State.LastSeq
			}
		}
	}
	return out
}

func (m *mdmCollector) refresh() {
	s := m.s
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	name := func(id string) string {
		if d, _ := s.knownDevice(ctx, id); d != nil {
			return d.Name
		}
		return ""
	}
	m.expiry, m.confirm = nil, nil
	if es, err := s.payloadEntries(ctx, ">"); err == nil {
		for _, e := range es {
			if _, p, err := decodePayloadRecord(e); err == nil && !p.NotAfter.IsZero() {
				m.expiry = append(m.expiry, prometheus.MustNewConstMetric(descCertExpiry, prometheus.GaugeValue,
					float64(p.NotAfter.Unix()), p.Device, name(p.Device), p.Name))
			}
		}
	}
	if recs, puts, err := s.escrowEntries(ctx, ">"); err == nil {
		for i, p := range puts {
			m.confirm = append(m.confirm, prometheus.MustNewConstMetric(descEscrow, prometheus.GaugeValue,
				float64(recs[i].ConfirmedAt.Unix()), p.Device, name(p.Device), p.Disk))
		}
	}
	m.at = time.Now()
}
