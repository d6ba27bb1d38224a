package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"fleet/model"
	"fleet/subjects"
)

// This file holds the coordinator's handlers of device traffic, all on its
// FLEET connection: signed facts and events, which it verifies and only then
// stores in CORE; requests for a device's desired state, answered only into
// that device's own inbox; and the trigger a device gets when its desired
// state changes. Devices never speak JetStream and never reach CORE.

// Reasons a handler drops a message, for fleet_requests_dropped_total.
const (
	dropReply    = "reply_not_own_inbox"
	dropUnknown  = "unknown_device"
	dropInvalid  = "invalid"
	dropRate     = "rate_limited"
	dropInactive = "device_not_active"
)

// reportRate and reportBurst bound what one device may send: enough for an
// apply's handful of events and an outbox drained after days offline, far
// too little to flood the streams.
const (
	reportRate  = 5.0 // per second
	reportBurst = 120
	// Bytes: a dozen times what a device reports normally (facts of a few
	// KiB a minute), a burst for an outbox drained after days away. One
	// device cannot fill the streams (and push out other devices' history)
	// before fleet_jetstream_stream_bytes warns.
	reportByteRate  = 1 << 10 // per second
	reportByteBurst = 1 << 20
)

// rateLimiter is a token bucket per key. Callers key it only by identities
// the coordinator knows (recorded devices, admins), so its size is bounded
// by the fleet, never by what a sender invents.
type rateLimiter struct {
	rate, burst float64
	now         func() time.Time

	mu   sync.Mutex
	buck map[string]*bucket
}

type bucket struct {
	tokens float64
	at     time.Time
}

func newRateLimiter(rate, burst float64, now func() time.Time) *rateLimiter {
	return &rateLimiter{rate: rate, burst: burst, now: now, buck: map[string]*bucket{}}
}

// allow takes a token of key, or reports that none is left.
func (l *rateLimiter) allow(key string) bool { return l.allowN(key, 1) }

// allowN takes n tokens of key, or none when fewer are left.
func (l *rateLimiter) allowN(key string, n float64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	b := l.buck[key]
	if b == nil {
		b = &bucket{tokens: l.burst, at: now}
		l.buck[key] = b
	}
	b.tokens = min(l.burst, b.tokens+now.Sub(b.at).Seconds()*l.rate)
	b.at = now
	if b.tokens < n {
		return false
	}
	b.tokens -= n
	return true
}

// allowReport takes one report of size bytes from device id.
func (s *services) allowReport(id string, size int) bool {
	return s.limiter.allow(id) && s.byteLimiter.allowN(id, float64(size))
}

// newDroppedCounter counts the requests and reports the handlers drop.
func newDroppedCounter() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "fleet_requests_dropped_total",
		Help: "Requests and device reports the coordinator dropped unanswered, by handler and reason (reply_not_own_inbox: a reply subject that is not the sender's own inbox).",
	}, []string{"handler", "reason"})
}

// newTrafficCounter counts the device handlers' work by kind: facts and
// events stored, desired-state triggers sent and gets answered.
func newTrafficCounter() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "fleet_device_messages_total",
		Help: "Device messages the coordinator handled: facts and events stored (kind facts, events), desired-state triggers sent (trigger) and desired-state reads answered (desired).",
	}, []string{"kind"})
}

func (s *services) drop(handler, reason string, m *nats.Msg) {
	s.dropped.WithLabelValues(handler, reason).Inc()
	s.log.Debug().Str("handler", handler).Str("reason", reason).Str("subject", m.Subject).Str("reply", m.Reply).Msg("dropped")
}

// deviceWorkers bounds the device messages handled at once. A handler
// verifies a signature (CPU) or waits on JetStream (a read from the stream
// leader): one goroutine per subscription would put a fleet's burst in a
// single line behind each wait.
const deviceWorkers = 64

// startDeviceHandlers subscribes the device-facing handlers on every
// lane, each in the coordinators' queue group so one coordinator of a
// cluster (and one lane of it) takes each message.
func (s *services) startDeviceHandlers() error {
	for _, h := range []struct {
		subj string
		core bool
		f    func(*lane, *nats.Msg)
	}{
		{subjects.AllFacts, false, s.pooled(s.onFacts)},
		{subjects.AllEvents, false, s.pooled(s.onEvent)},
		{subjects.AllDesiredGet, false, s.pooled(func(_ *lane, m *nats.Msg) { s.onDesiredGet(m) })},
		// The KV's change notifications, inside CORE.
		{subjects.AllDesired, true, s.onDesiredChanged},
	} {
		if err := s.subscribeLanes(h.subj, h.core, h.f); err != nil {
			return err
		}
	}
	// Known to the server before the coordinator says it is ready.
	for _, l := range s.lanes {
		if err := l.fc.Flush(); err != nil {
			return fmt.Errorf("flush device handlers: %w", err)
		}
		if err := l.nc.Flush(); err != nil {
			return fmt.Errorf("flush device handlers: %w", err)
		}
	}
	return nil
}

// pooled runs f for each message on a goroutine of its own, at most
// deviceWorkers at once; beyond that the subscription waits (its pending
// buffer holds the rest).
func (s *services) pooled(f func(*lane, *nats.Msg)) func(*lane, *nats.Msg) {
	return func(l *lane, m *nats.Msg) {
		s.workers <- struct{}{}
		if !s.begin() {
			<-s.workers
			return
		}
		go func() {
			defer func() {
				<-s.workers
				s.wg.Done()
			}()
			f(l, m)
		}()
	}
}

// knownDevice returns device id's record, from the index when it has it
// and from the bucket otherwise (a device enrolled a moment ago).
func (s *services) knownDevice(ctx context.Context, id string) (*model.Device, error) {
	if x := s.c.index; x != nil {
		if d := x.record(id); d != nil {
			return d, nil
		}
	}
	d, _, err := s.getDevice(ctx, id)
	return d, err
}

// deviceFor checks a device message: its subject names a device that is
// recorded and active, and its reply (when it wants one) is that device's
// own inbox. It returns the device, or "" and drops the message.
func (s *services) deviceFor(handler string, m *nats.Msg, id string, ok bool) *model.Device {
	if !ok {
		s.drop(handler, dropInvalid, m)
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d, err := s.knownDevice(ctx, id)
	if err != nil || d == nil {
		s.drop(handler, dropUnknown, m)
		return nil
	}
	if m.Reply != "" && !subjects.InInbox(m.Reply, subjects.DeviceInboxPrefix(siteOf(d), id)) {
		s.drop(handler, dropReply, m)
		return nil
	}
	if d.Status != model.DeviceActive {
		s.drop(handler, dropInactive, m)
		return nil
	}
	return d
}

func siteOf(d *model.Device) string {
	if d.Site == "" {
		return subjects.DefaultSite
	}
	return d.Site
}

func (s *services) onFacts(l *lane, m *nats.Msg) {
	s.onReport(l, "facts", m, func(id string) ([]byte, string, error) {
		f, err := model.ParseFacts(m.Data, id)
		if err != nil {
			return nil, "", err
		}
		b, _ := json.Marshal(f)
		return b, "", nil
	}, nil)
}

func (s *services) onEvent(l *lane, m *nats.Msg) {
	var ev *model.Event
	s.onReport(l, "events", m, func(id string) ([]byte, string, error) {
		var err error
		if ev, err = model.ParseEvent(m.Data, id); err != nil {
			return nil, "", err
		}
		b, _ := json.Marshal(ev)
		// Deduplication is per stream: the device ID keeps one device's
		// IDs from colliding with (or suppressing) another's.
		return b, id + "/" + model.EventMsgID(ev), nil
	}, func(site string) {
		if ev.Cache != nil && s.cache != nil {
			s.cache.countFetched(site, ev.Cache)
		}
	})
}

// onReport takes one signed report of a device: the sender must be a
// recorded, active device answering into its own inbox; verify checks the
// signature and returns what to store (and its deduplication ID); the
// device's rate decides; then it is stored on the subject it came on, and
// stored (if any) is called with the device's site once it is, the first
// time only.
func (s *services) onReport(l *lane, handler string, m *nats.Msg, verify func(id string) ([]byte, string, error), stored func(site string)) {
	s.yieldToAnnounce()
	id, ok := subjects.DeviceFromSubject(m.Subject)
	d := s.deviceFor(handler, m, id, ok)
	if d == nil {
		return
	}
	data, msgID, err := verify(id)
	if err != nil {
		s.refuseReport(handler, m, err)
		return
	}
	if !s.allowReport(id, len(m.Data)) {
		s.drop(handler, dropRate, m)
		s.ack(m, model.ReportAck{Error: "too many reports: slow down"})
		return
	}
	var then func()
	if stored != nil {
		site := siteOf(d)
		then = func() { stored(site) }
	}
	s.store(l, m, handler, id, m.Subject, data, msgID, then)
}

// refuseReport answers a report that will never be stored as it is.
func (s *services) refuseReport(handler string, m *nats.Msg, err error) {
	s.drop(handler, dropInvalid, m)
	s.ack(m, model.ReportAck{Error: err.Error(), Permanent: true})
}

// store appends a verified report to its CORE stream and acknowledges it
// to the device once JetStream has, then calls then (if any) unless the
// report was a duplicate. The wait runs apart from the subscription,
// bounded, so one slow write does not hold up the rest.
func (s *services) store(l *lane, m *nats.Msg, kind, id, subj string, data []byte, msgID string, then func()) {
	if s.presence != nil {
		s.presence.reported(id)
	}
	opts := []jetstream.PublishOpt{}
	if msgID != "" {
		opts = append(opts, jetstream.WithMsgID(msgID))
	}
	f, err := l.js.PublishAsync(subj, data, opts...)
	if err != nil {
		s.ack(m, model.ReportAck{Error: "the coordinator could not store the report: " + err.Error()})
		return
	}
	if !s.begin() {
		return
	}
	go func() {
		defer s.wg.Done()
		select {
		case pa := <-f.Ok():
			s.traffic.WithLabelValues(kind).Inc()
			s.ack(m, model.ReportAck{Seq: pa.Sequence, Duplicate: pa.Duplicate})
			if then != nil && !pa.Duplicate {
				then()
			}
		case err := <-f.Err():
			ack := model.ReportAck{Error: "the coordinator could not store the report: " + err.Error()}
			var apiErr *jetstream.APIError
			if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamMessageExceedsMaximum {
				ack.Permanent = true
			}
			s.ack(m, ack)
		case <-time.After(10 * time.Second):
			s.ack(m, model.ReportAck{Error: "the coordinator could not store the report in time"})
		}
	}()
}

func (s *services) ack(m *nats.Msg, a model.ReportAck) {
	if m.Reply == "" {
		return
	}
	b, _ := json.Marshal(a)
	_ = m.Respond(b)
}

// onDesiredGet answers a device's request for its own desired state, only
// into that device's own inbox.
func (s *services) onDesiredGet(m *nats.Msg) {
	id, ok := desiredGetDevice(m.Subject)
	if m.Reply == "" {
		s.drop("desired", dropInvalid, m)
		return
	}
	if s.deviceFor("desired", m, id, ok) == nil {
		return
	}
	var r model.DesiredReply
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	seq, value, err := s.desiredFromLeader(ctx, id)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
	case err != nil:
		r.Error = "read desired state: " + err.Error()
	case !json.Valid(value):
		// Only the coordinator writes the bucket; say so rather than send
		// a reply the device cannot read.
		r.Seq, r.Damaged = seq, "the stored desired state is not valid JSON"
	default:
		r.Seq, r.Desired = seq, value
	}
	b, _ := json.Marshal(r)
	s.traffic.WithLabelValues("desired").Inc()
	_ = m.Respond(b)
}

// desiredFromLeader reads device id's desired state from the stream
// leader. A direct get (what KV.Get uses) may be answered by a replica that
// has not applied the write the device was just told about, and the device
// would take the old value and wait for its re-check; the leader has it.
func (s *services) desiredFromLeader(ctx context.Context, id string) (uint64, []byte, error) {
	req, _ := json.Marshal(map[string]string{"last_by_subj": subjects.KVKey(subjects.BucketDesired, id)})
	m, err := s.c.nc.RequestWithContext(ctx, subjects.JSAPIPrefix("")+".STREAM.MSG.GET."+subjects.KVStream(subjects.BucketDesired), req)
	if err != nil {
		return 0, nil, err
	}
	var resp struct {
		Message *struct {
			Seq  uint64 `json:"seq"`
			Data []byte `json:"data"`
			Hdrs []byte `json:"hdrs"`
		} `json:"message"`
		Error *struct {
			Code        int    `json:"code"`
			Description string `json:"description"`
		} `json:"error"`
	}
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		return 0, nil, fmt.Errorf("stream message: %w", err)
	}
	if resp.Error != nil {
		if resp.Error.Code == 404 {
			return 0, nil, jetstream.ErrKeyNotFound
		}
		return 0, nil, fmt.Errorf("stream message: %s", resp.Error.Description)
	}
	if resp.Message == nil {
		return 0, nil, jetstream.ErrKeyNotFound
	}
	// A delete or purge marker: no desired state.
	if bytes.Contains(resp.Message.Hdrs, []byte("KV-Operation: DEL")) || bytes.Contains(resp.Message.Hdrs, []byte("KV-Operation: PURGE")) {
		return 0, nil, jetstream.ErrKeyNotFound
	}
	return resp.Message.Seq, resp.Message.Data, nil
}

func desiredGetDevice(subj string) (string, bool) {
	if len(subj) <= len(subjects.DesiredGet)+1 || subj[:len(subjects.DesiredGet)+1] != subjects.DesiredGet+"." {
		return "", false
	}
	id := subj[len(subjects.DesiredGet)+1:]
	return id, subjects.ValidDeviceID(id)
}

// announcement is one device's desired-state change to tell it about: the
// entry written at seq (value nil: deleted); seq 0 sends a bare trigger
// and the device reads its state itself.
type announcement struct {
	id, site string
	seq      uint64
	value    []byte
}

// trigger is the message that tells a device: as a read's reply would be,
// so a deploy reaches the device in one message.
func (a announcement) trigger(pace *model.Pace) []byte {
	r := model.DesiredReply{Pace: pace}
	switch {
	case a.seq == 0:
	case a.value == nil:
		r.Seq = a.seq
	case !json.Valid(a.value):
		r.Seq, r.Damaged = a.seq, "the stored desired state is not valid JSON"
	default:
		// By hand: json.Marshal would check and compact the whole stored
		// value once more, for each of a batch's devices.
		b := make([]byte, 0, len(a.value)+96)
		b = append(b, `{"seq":`...)
		b = strconv.AppendUint(b, a.seq, 10)
		b = append(b, `,"desired":`...)
		b = append(b, a.value...)
		if pace != nil {
			p, _ := json.Marshal(pace)
			b = append(b, `,"pace":`...)
			b = append(b, p...)
		}
		return append(b, '}')
	}
	b, _ := json.Marshal(r)
	return b
}

// announce tells each device of its change (see announcer).
func (s *services) announce(as []announcement) {
	tell, done := s.announcer(len(as))
	for _, a := range as {
		tell(a)
	}
	done()
}

// announcer tells a batch of n devices of their changes, one tell each as
// its state is written, and done once all are: a device's triggers always
// on the same notify connection (in order), the connections in parallel,
// each with a goroutine of its own so that tell never waits for the
// server. Reports wait while a batch is told (see yieldToAnnounce). tell
// and done are for one goroutine.
func (s *services) announcer(n int) (tell func(announcement), done func()) {
	finished := make(chan struct{})
	s.announcing.Store(&finished)
	pace := paceFor(n)
	queues := make([]chan announcement, len(s.notifiers))
	var wg sync.WaitGroup
	told := 0
	tell = func(a announcement) {
		i := laneIndex(a.id, len(s.notifiers))
		if queues[i] == nil {
			// Room for a lane's share and then some: tell blocks only
			// when a lane is far behind (it is the bottleneck then).
			q := make(chan announcement, min(n, maxLaneQueue))
			queues[i] = q
			nc := s.notifiers[i]
			wg.Go(func() {
				for a := range q {
					_ = nc.Publish(subjects.DeviceNotify(a.site, a.id), a.trigger(pace))
				}
				_ = nc.Flush()
			})
		}
		queues[i] <- a
		told++
	}
	done = func() {
		for _, q := range queues {
			if q != nil {
				close(q)
			}
		}
		wg.Wait()
		s.traffic.WithLabelValues("trigger").Add(float64(told))
		// Another batch may have started meanwhile: its mark stays.
		s.announcing.CompareAndSwap(&finished, nil)
		close(finished)
	}
	return tell, done
}

// maxLaneQueue bounds the triggers queued for one notify connection.
const maxLaneQueue = 4096

// A batch of paceFrom devices or more is told to pace its reports (see
// model.Pace): its progress events wait paceProgressAfter, and the facts
// after its applies are spread to come at about paceFactsRate a second.
// A smaller batch reports as it goes, every step at once.
const (
	paceFrom          = 1000
	paceProgressAfter = 5 * time.Second
	paceFactsRate     = 500
)

// paceFor is the pace for a batch of n triggers, nil when it needs none.
func paceFor(n int) *model.Pace {
	if n < paceFrom {
		return nil
	}
	splay := min(time.Duration(n)*time.Second/paceFactsRate, model.MaxFactsSplay)
	return &model.Pace{ProgressAfterMS: paceProgressAfter.Milliseconds(), FactsSplayMS: splay.Milliseconds()}
}

// maxYield bounds how long a report waits for an announcement.
const maxYield = 2 * time.Second

// yieldToAnnounce waits (a little at most) while a batch of triggers goes
// out: the devices told first apply at once and report, and verifying
// their reports would otherwise take the CPU the rest of the batch needs.
// A report can wait a second or two; devices still waiting for their
// trigger hold up the whole rollout.
func (s *services) yieldToAnnounce() {
	if ch := s.announcing.Load(); ch != nil {
		select {
		case <-*ch:
		case <-time.After(maxYield):
		}
	}
}

// onDesiredChanged turns fleet_desired's change notification (inside
// CORE) into a bare trigger in the device's own inbox: the device reads its
// state itself. Writes the rollout engine announces itself (with the state,
// once their batch is written) carry HeaderAnnounced and are skipped.
func (s *services) onDesiredChanged(_ *lane, m *nats.Msg) {
	if m.Header.Get(subjects.HeaderAnnounced) != "" {
		return
	}
	id, ok := subjects.DeviceFromSubject(m.Subject)
	if !ok {
		return
	}
	s.announceDesired(id, 0, nil)
}

// announceDesired tells device id, when it is active, that its desired
// state changed (see announcement).
func (s *services) announceDesired(id string, seq uint64, value []byte) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d, err := s.knownDevice(ctx, id)
	if err != nil || d == nil || d.Status != model.DeviceActive {
		// It reads its state when it becomes active.
		s.dropped.WithLabelValues("notify", dropInactive).Inc()
		return
	}
	s.announce([]announcement{{id: id, site: siteOf(d), seq: seq, value: value}})
}
