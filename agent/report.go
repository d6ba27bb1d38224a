package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/model"
)

// OutboxFile holds the apply results not yet acknowledged by JetStream, so
// what the agent did while offline (or just before a crash) is reported
// later. Progress events wait in memory only: after a crash they describe
// an apply that is over (the resumed apply reports afresh), and writing
// the file for each of them cost a device a synced write per step.
const OutboxFile = "outbox.json"

// maxOutbox bounds the outbox; the oldest non-final events go first.
const maxOutbox = 500

type outboxItem struct {
	MsgID   string          `json:"msg_id"`
	Subject string          `json:"subject"`
	Data    json.RawMessage `json:"data"`
	Final   bool            `json:"final,omitempty"`
	Attempt string          `json:"attempt,omitempty"`
	// NotBefore holds a paced progress event back (see model.Pace); only
	// results are written to the outbox, so it is never on disk.
	NotBefore time.Time `json:"-"`
}

// reporter sends events in order, each signed with the device key, and
// drops one from the outbox once the coordinator acknowledged storing it
// (it deduplicates a resumed apply's repeated events by their IDs).
type reporter struct {
	dir string
	nc  *nats.Conn
	key nkeys.KeyPair
	log zerolog.Logger

	mu    sync.Mutex
	queue []outboxItem
	// onDisk are the IDs of the results the outbox file holds.
	onDisk []string
	// inFlight is the ID of the event being sent, if any.
	inFlight string
	wake     chan struct{}
}

func newReporter(dir string, nc *nats.Conn, key nkeys.KeyPair, log zerolog.Logger) (*reporter, error) {
	r := &reporter{dir: dir, nc: nc, key: key, log: log, wake: make(chan struct{}, 1)}
	b, err := os.ReadFile(filepath.Join(dir, OutboxFile))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read outbox: %w", err)
	}
	if len(b) > 0 {
		if err := json.Unmarshal(b, &r.queue); err != nil {
			// A damaged outbox loses old events, not the agent.
			log.Warn().Err(err).Msg("outbox is damaged; dropping it")
			r.queue = nil
		}
	}
	for _, it := range r.queue {
		r.onDisk = append(r.onDisk, it.MsgID)
	}
	return r, nil
}

// enqueue adds an event and persists the outbox before returning. A
// progress event with notBefore set is not sent before then: if the
// apply's next event comes first, it takes its place.
func (r *reporter) enqueue(subject, msgID string, ev model.Event, notBefore time.Time) error {
	data, err := json.Marshal(ev)
	if err != nil {
		return fmt.Errorf("encode event: %w", err)
	}
	r.mu.Lock()
	// A progress event of an apply still queued when that apply's next
	// event comes is superseded: the coordinator needs where the apply is,
	// not every step it took while the device could not report (or while
	// a whole fleet's events were queued ahead). The one on its way stays,
	// and so does the head unless it is held back; results are never
	// dropped.
	q := r.queue[:0]
	for i, it := range r.queue {
		superseded := !it.Final && it.Attempt != "" && it.Attempt == ev.Attempt && it.MsgID != r.inFlight
		if superseded && (i > 0 || !it.NotBefore.IsZero()) {
			continue
		}
		q = append(q, it)
	}
	item := outboxItem{MsgID: msgID, Subject: subject, Data: data, Final: ev.Result.Final(), Attempt: ev.Attempt}
	if !item.Final {
		item.NotBefore = notBefore
	}
	r.queue = append(q, item)
	for len(r.queue) > maxOutbox {
		drop := 0
		for i, it := range r.queue {
			if !it.Final {
				drop = i
				break
			}
		}
		r.queue = append(r.queue[:drop], r.queue[drop+1:]...)
	}
	err = r.persistLocked()
	r.mu.Unlock()
	r.kick()
	return err
}

// persistLocked writes the queued results to the outbox file when they
// are not what it holds already.
func (r *reporter) persistLocked() error {
	var finals []outboxItem
	var ids []string
	for _, it := range r.queue {
		if it.Final {
			finals = append(finals, it)
			ids = append(ids, it.MsgID)
		}
	}
	if slices.Equal(ids, r.onDisk) {
		return nil
	}
	b, err := json.Marshal(finals)
	if err != nil {
		return fmt.Errorf("encode outbox: %w", err)
	}
	if err := accounts.WriteSecretFile(filepath.Join(r.dir, OutboxFile), b); err != nil {
		return err
	}
	r.onDisk = ids
	return nil
}

func (r *reporter) kick() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// run publishes the queue until ctx ends; after a failure it waits for a
// kick (reconnect, new event) or a retry timer.
func (r *reporter) run(ctx context.Context) {
	retry := time.NewTimer(time.Hour)
	defer retry.Stop()
	for {
		for r.sendOne(ctx, true) {
		}
		r.mu.Lock()
		pending := len(r.queue)
		wait := r.heldForLocked(time.Now())
		if wait <= 0 {
			wait = 3 * time.Second // a send failed: retry
		}
		r.mu.Unlock()
		if pending > 0 {
			retry.Reset(wait)
		}
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		case <-retry.C:
		}
	}
}

// heldForLocked is how long until the first held event may go, when every
// queued event is held (0 otherwise).
func (r *reporter) heldForLocked(now time.Time) time.Duration {
	var wait time.Duration
	for _, it := range r.queue {
		d := it.NotBefore.Sub(now)
		if d <= 0 {
			return 0
		}
		if wait == 0 || d < wait {
			wait = d
		}
	}
	return wait
}

// sendOne publishes the first queued event that may go (with hold, not a
// progress event still held back: the events behind a held one are other
// applies' and commands', which need not wait for it); it reports whether
// to go on.
func (r *reporter) sendOne(ctx context.Context, hold bool) bool {
	r.mu.Lock()
	i := 0
	if hold {
		now := time.Now()
		for i < len(r.queue) && now.Before(r.queue[i].NotBefore) {
			i++
		}
	}
	if i == len(r.queue) {
		r.mu.Unlock()
		return false // empty, or all held: run wakes for them
	}
	it := r.queue[i]
	r.inFlight = it.MsgID
	r.mu.Unlock()
	err := sendReport(ctx, r.nc, r.key, it.Subject, model.PurposeEvent, it.Data)
	r.mu.Lock()
	r.inFlight = ""
	r.mu.Unlock()
	if err != nil && permanentPublishError(err) {
		// Retrying cannot help, and the queue behind it would wait forever.
		r.log.Error().Err(err).Str("msg_id", it.MsgID).Str("subject", it.Subject).Int("bytes", len(it.Data)).
			Msg("the server refuses this event for good; dropping it")
	} else if err != nil {
		r.log.Debug().Err(err).Str("msg_id", it.MsgID).Msg("event not published yet")
		return false
	}
	r.mu.Lock()
	for j, q := range r.queue {
		if q.MsgID == it.MsgID {
			r.queue = append(r.queue[:j], r.queue[j+1:]...)
			break
		}
	}
	if err := r.persistLocked(); err != nil {
		r.log.Warn().Err(err).Msg("outbox")
	}
	r.mu.Unlock()
	return true
}

// errReportRefused wraps the coordinator's final refusal of a report.
var errReportRefused = errors.New("the coordinator refuses this report")

// permanentPublishError reports whether the coordinator will never take the
// message as it is (too large, malformed), as opposed to being away.
func permanentPublishError(err error) bool {
	return errors.Is(err, nats.ErrMaxPayload) || errors.Is(err, nats.ErrBadSubject) || errors.Is(err, errReportRefused)
}

// sendReport signs payload (JSON) for purpose with the device key, sends it
// to subject and waits for the coordinator's acknowledgement.
func sendReport(ctx context.Context, nc *nats.Conn, key nkeys.KeyPair, subject, purpose string, payload []byte) error {
	signed, err := model.SignBytes(key, purpose, payload)
	if err != nil {
		return fmt.Errorf("%w: %v", errReportRefused, err)
	}
	body, _ := json.Marshal(signed)
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	msg, err := nc.RequestWithContext(pctx, subject, body)
	if err != nil {
		return fmt.Errorf("send %s: %w", subject, err)
	}
	var ack model.ReportAck
	if err := json.Unmarshal(msg.Data, &ack); err != nil {
		return fmt.Errorf("send %s: the acknowledgement does not decode: %w", subject, err)
	}
	if ack.Error != "" {
		if ack.Permanent {
			return fmt.Errorf("%w: %s", errReportRefused, ack.Error)
		}
		return fmt.Errorf("send %s: %s", subject, ack.Error)
	}
	return nil
}

// flush tries to publish everything queued until ctx ends (clean stop),
// held progress events too: they are where a stopped apply got to, and
// only results outlive the process.
func (r *reporter) flush(ctx context.Context) {
	for ctx.Err() == nil && r.sendOne(ctx, false) {
	}
}
