package broker

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"fleet/model"
	"fleet/subjects"
)

// services are the coordinator's request handlers: enrollment, the admin
// API and the presence index they read. They start after the streams exist
// and stop before the coordinator's connections close.
type services struct {
	c   *Coordinator
	log zerolog.Logger
	now func() time.Time

	devices jetstream.KeyValue
	tokens  jetstream.KeyValue
	admins  jetstream.KeyValue
	// lanes carry device traffic (broker/lanes.go); notifiers the
	// desired-state triggers.
	lanes     []*lane
	notifiers []*nats.Conn
	// announcing is closed when the batch of triggers going out is sent.
	announcing atomic.Pointer[chan struct{}]

	// dropped counts requests and reports dropped unanswered; limiter
	// bounds each device's reports.
	dropped              *prometheus.CounterVec
	limiter, byteLimiter *rateLimiter
	// traffic counts what the device handlers did: reports stored,
	// triggers sent, desired states answered.
	traffic *prometheus.CounterVec
	// auditLimiter bounds the refusals each admin (and all non-admins
	// together) may add to the audit; auditSuppressed counts the rest.
	auditLimiter    *rateLimiter
	auditSuppressed prometheus.Counter
	// auditMu orders this coordinator's audit appends; auditSeq and
	// auditPrev are the chain's tail as last seen.
	auditMu        sync.Mutex
	auditTailKnown bool
	auditSeq       uint64
	auditPrev      string

	presence *Presence
	nonces   jetstream.KeyValue
	// payloads and escrow are the MDM duties' buckets (broker/mdm.go).
	payloads, escrow jetstream.KeyValue
	// spenders gather each token's concurrent enrolments (spend).
	spenders sync.Map

	api  micro.Service
	subs []*nats.Subscription
	// statusRep is the status report last built, for the later pages of
	// its listing (statusFor).
	statusMu  sync.Mutex
	statusRep *model.StatusReport
	statusAt  time.Time

	// payloadKeys is which payload keys each device has.
	payloadKeys *payloadKeys
	// cache is the binary cache (broker/cache.go).
	cache *cacheStore

	// workers bounds the device handlers running at once.
	workers chan struct{}
	// enrollSem bounds concurrent enrollment handlers.
	enrollSem chan struct{}
	wg        sync.WaitGroup
	workMu    sync.Mutex
	stopping  bool
}

// enrollWorkers bounds the enrolments handled at once. Each waits on a
// few reads and writes of the buckets and a batched spend of its token,
// little CPU: a fleet being installed from one token is served as fast as
// those round trips allow only with many in flight.
const enrollWorkers = 64

func (c *Coordinator) startServices(ctx context.Context) error {
	s := &services{
		c:         c,
		log:       c.log.With().Str("component", "services").Logger(),
		now:       time.Now,
		enrollSem: make(chan struct{}, enrollWorkers),
		workers:   make(chan struct{}, deviceWorkers),
		dropped:   newDroppedCounter(),
		traffic:   newTrafficCounter(),
	}
	s.limiter = newRateLimiter(reportRate, reportBurst, s.now)
	s.byteLimiter = newRateLimiter(reportByteRate, reportByteBurst, s.now)
	s.auditLimiter = newRateLimiter(auditRefusalRate, auditRefusalBurst, s.now)
	s.auditSuppressed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "fleet_audit_refusals_suppressed_total",
		Help: "Refused admin requests not written to the audit because their sender passed its rate.",
	})
	var err error
	if err := s.openLanes(); err != nil {
		s.closeLanes()
		return err
	}
	for name, kv := range map[string]*jetstream.KeyValue{
		subjects.BucketDevices: &s.devices, subjects.BucketTokens: &s.tokens, subjects.BucketAdmins: &s.admins,
		subjects.BucketNonces: &s.nonces,
	} {
		if *kv, err = c.js.KeyValue(ctx, name); err != nil {
			return fmt.Errorf("bucket %s: %w", name, err)
		}
	}
	c.svc = s
	if s.presence, err = startPresence(c, s); err != nil {
		return err
	}
	if err := s.registerOwner(ctx); err != nil {
		return err
	}
	if err := s.startEnroll(); err != nil {
		return err
	}
	if err := s.startAPI(); err != nil {
		return err
	}
	// A flush makes every subscription known to the server before Start
	// returns, so a client that connects next is answered.
	if err := s.startDeviceHandlers(); err != nil {
		return err
	}
	if err := s.startMDM(); err != nil {
		return err
	}
	if err := s.startCache(ctx); err != nil {
		return err
	}
	if err := c.fc.Flush(); err != nil {
		return fmt.Errorf("flush service subscriptions: %w", err)
	}
	if err := c.nc.Flush(); err != nil {
		return fmt.Errorf("flush service subscriptions: %w", err)
	}
	return c.sys.Flush()
}

// stop ends the handlers and waits for those in flight.
func (s *services) stop() {
	if s == nil {
		return
	}
	if s.api != nil {
		_ = s.api.Stop()
	}
	for _, sub := range s.subs {
		_ = sub.Unsubscribe()
	}
	s.payloadKeys.stop()
	s.cache.stop()
	// No handler starts work once stopping is set, so Wait cannot race
	// with an Add from a callback still running.
	s.workMu.Lock()
	s.stopping = true
	s.workMu.Unlock()
	s.wg.Wait()
	s.closeLanes()
}

// begin registers work that stop waits for; false once stopping.
func (s *services) begin() bool {
	s.workMu.Lock()
	defer s.workMu.Unlock()
	if s.stopping {
		return false
	}
	s.wg.Add(1)
	return true
}

// Presence is the coordinator's index of which devices are online and when
// each was last seen.
func (c *Coordinator) Presence() *Presence {
	if c.svc == nil {
		return nil
	}
	return c.svc.presence
}
