package agent

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/model"
	"fleet/subjects"
)

// natsPair starts an embedded nats-server (no auth) and returns two
// connections to it: the device's and the coordinator's.
func natsPair(t *testing.T) (device, coord *nats.Conn) {
	t.Helper()
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: server.RANDOM_PORT, NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	t.Cleanup(s.Shutdown)
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server did not start")
	}
	conn := func() *nats.Conn {
		nc, err := nats.Connect(s.ClientURL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		return nc
	}
	return conn(), conn()
}

func deviceKey(t *testing.T) (nkeys.KeyPair, string) {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	return kp, pub
}

func respondJSON(t *testing.T, m *nats.Msg, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		t.Error(err)
		return
	}
	if err := m.Respond(b); err != nil {
		t.Error(err)
	}
}

// eventDesk plays the coordinator's event intake: it verifies each event's
// signature as the coordinator does, records the good ones (got: every
// delivery; stored: the acknowledged ones) and answers with the ack set by
// the test (an unverifiable event is refused for good).
type eventDesk struct {
	// stored gets each event stored, in order (buffered).
	stored chan model.Event

	mu     sync.Mutex
	ack    model.ReportAck
	got    []model.Event
	badSig []error
}

func (d *eventDesk) setAck(a model.ReportAck) {
	d.mu.Lock()
	d.ack = a
	d.mu.Unlock()
}

func (d *eventDesk) received() ([]model.Event, []error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]model.Event(nil), d.got...), append([]error(nil), d.badSig...)
}

func serveEvents(t *testing.T, coord *nats.Conn, id string) *eventDesk {
	t.Helper()
	d := &eventDesk{stored: make(chan model.Event, 100)}
	_, err := coord.Subscribe(subjects.DeviceEvents(id), func(m *nats.Msg) {
		ev, err := model.ParseEvent(m.Data, id)
		d.mu.Lock()
		ack := d.ack
		if err != nil {
			d.badSig = append(d.badSig, err)
			ack = model.ReportAck{Error: err.Error(), Permanent: true}
		} else {
			d.got = append(d.got, *ev)
			if ack.Error == "" {
				d.stored <- *ev
			}
		}
		d.mu.Unlock()
		respondJSON(t, m, ack)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := coord.Flush(); err != nil {
		t.Fatal(err)
	}
	return d
}

func outboxIDs(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, OutboxFile))
	if err != nil {
		t.Fatal(err)
	}
	var items []outboxItem
	if err := json.Unmarshal(b, &items); err != nil {
		t.Fatal(err)
	}
	ids := make([]string, len(items))
	for i, it := range items {
		ids[i] = it.MsgID
	}
	return ids
}

func queueIDs(r *reporter) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	ids := make([]string, len(r.queue))
	for i, it := range r.queue {
		ids[i] = it.MsgID
	}
	return ids
}

// An apply's progress events queued behind the head are superseded by the
// same apply's next event; results and other applies' events stay, in
// order, on disk as in memory.
func TestReporterCoalescesProgress(t *testing.T) {
	nc, _ := natsPair(t)
	kp, id := deviceKey(t)
	dir := t.TempDir()
	r, err := newReporter(dir, nc, kp, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	add := func(attempt string, st model.State, res model.Result) string {
		t.Helper()
		ev := model.Event{Device: id, Time: time.Now().UTC(), State: st, Result: res, Attempt: attempt}
		msgID := model.EventMsgID(&ev)
		if err := r.enqueue(subjects.DeviceEvents(id), msgID, ev, time.Time{}); err != nil {
			t.Fatal(err)
		}
		return msgID
	}
	head := add("a1", model.StateChecking, "")
	add("a1", model.StateFetching, "")
	add("a1", model.StateApplying, "")
	done1 := add("a1", model.StateIdle, model.ResultSucceeded)
	add("a2", model.StateChecking, "")
	add("a2", model.StateFetching, "")
	applying := add("a2", model.StateApplying, "")
	// a1's fetching and applying gave way to its result; a2's checking
	// and fetching to its applying.
	want := []string{head, done1, applying}
	if got := queueIDs(r); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("queue %v, want %v", got, want)
	}
	// Only the result is on disk: progress waits in memory.
	if got := outboxIDs(t, dir); strings.Join(got, " ") != done1 {
		t.Fatalf("outbox file %v, want [%s]", got, done1)
	}
}

// The outbox keeps an event the coordinator could not store (or did not
// answer), drops one it refuses for good and removes one it acknowledged;
// each reaches the coordinator signed by the device.
func TestReporterOutboxFollowsAcks(t *testing.T) {
	nc, coord := natsPair(t)
	kp, id := deviceKey(t)
	dir := t.TempDir()
	r, err := newReporter(dir, nc, kp, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for i, st := range []model.State{model.StateChecking, model.StateFetching, model.StateApplying} {
		// Three applies' results (kept on disk, and never coalesced).
		ev := model.Event{Device: id, Time: time.Now().UTC(), State: st, Result: model.ResultSucceeded,
			Attempt: "a" + string(rune('1'+i)), ReleaseID: "r" + string(rune('0'+i))}
		msgID := model.EventMsgID(&ev)
		ids = append(ids, msgID)
		if err := r.enqueue(subjects.DeviceEvents(id), msgID, ev, time.Time{}); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	expect := func(step string, sent bool, want []string) {
		t.Helper()
		if got := r.sendOne(ctx, true); got != sent {
			t.Fatalf("%s: sendOne = %v, want %v", step, got, sent)
		}
		if got := queueIDs(r); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Fatalf("%s: queue %v, want %v", step, got, want)
		}
		// The outbox on disk follows the queue, so a restart resends
		// exactly what was not taken.
		if got := outboxIDs(t, dir); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Fatalf("%s: outbox file %v, want %v", step, got, want)
		}
	}

	// Nobody answers: the coordinator is away, the event stays.
	expect("no responders", false, ids)

	d := serveEvents(t, coord, id)
	d.setAck(model.ReportAck{Error: "stream unavailable"})
	expect("transient error", false, ids)
	d.setAck(model.ReportAck{Error: "event too large", Permanent: true})
	expect("permanent refusal", true, ids[1:])
	d.setAck(model.ReportAck{Seq: 7})
	expect("stored", true, ids[2:])
	d.setAck(model.ReportAck{Seq: 7, Duplicate: true})
	expect("duplicate", true, nil)
	expect("empty", false, nil)

	got, bad := d.received()
	if len(bad) != 0 {
		t.Fatalf("the coordinator could not verify events: %v", bad)
	}
	// Sent in order, the head again after each failure.
	want := []model.State{model.StateChecking, model.StateChecking, model.StateFetching, model.StateApplying}
	if len(got) != len(want) {
		t.Fatalf("coordinator got %d events, want %d: %+v", len(got), len(want), got)
	}
	for i, ev := range got {
		if ev.State != want[i] || ev.Device != id || ev.Attempt == "" {
			t.Fatalf("event %d: %+v, want state %s", i, ev, want[i])
		}
	}

	// A restarted agent resends what is left: nothing here, and the
	// remaining events otherwise.
	if err := r.enqueue(subjects.DeviceEvents(id), "left", model.Event{Device: id, Time: time.Now().UTC(), State: model.StateIdle, Result: model.ResultFailed}, time.Time{}); err != nil {
		t.Fatal(err)
	}
	r2, err := newReporter(dir, nc, kp, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	if got := queueIDs(r2); len(got) != 1 || got[0] != "left" {
		t.Fatalf("reloaded outbox %v, want [left]", got)
	}
}

// An event the coordinator cannot verify (signed by another key than the
// device it names) is refused for good and dropped, not retried forever.
func TestReporterDropsEventSignedByAnotherKey(t *testing.T) {
	nc, coord := natsPair(t)
	_, id := deviceKey(t)
	other, _ := deviceKey(t)
	d := serveEvents(t, coord, id)
	d.setAck(model.ReportAck{Seq: 1})
	r, err := newReporter(t.TempDir(), nc, other, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	if err := r.enqueue(subjects.DeviceEvents(id), "x", model.Event{Device: id, Time: time.Now().UTC(), State: model.StateIdle}, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if !r.sendOne(context.Background(), true) || len(queueIDs(r)) != 0 {
		t.Fatalf("a refused event stays queued: %v", queueIDs(r))
	}
	if got, bad := d.received(); len(got) != 0 || len(bad) != 1 || !errors.Is(bad[0], model.ErrUnknownSigner) {
		t.Fatalf("coordinator stored %v, refused %v", got, bad)
	}
}

// sendReport signs for the purpose given: facts verify as facts, not as an
// event; an ack that does not decode is an error to retry.
func TestSendReportSignsForPurpose(t *testing.T) {
	nc, coord := natsPair(t)
	kp, id := deviceKey(t)
	var (
		mu  sync.Mutex
		got []*model.Facts
	)
	reply := []byte(`{"seq":1}`)
	_, err := coord.Subscribe(subjects.DeviceFacts(id), func(m *nats.Msg) {
		f, err := model.ParseFacts(m.Data, id)
		if err != nil {
			respondJSON(t, m, model.ReportAck{Error: err.Error(), Permanent: true})
			return
		}
		mu.Lock()
		got = append(got, f)
		r := reply
		mu.Unlock()
		_ = m.Respond(r)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := coord.Flush(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	facts, _ := json.Marshal(model.Facts{Device: id, Hostname: "h1"})
	if err := sendReport(ctx, nc, kp, subjects.DeviceFacts(id), model.PurposeFacts, facts); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	if len(got) != 1 || got[0].Hostname != "h1" {
		t.Fatalf("coordinator got %+v", got)
	}
	mu.Unlock()

	err = sendReport(ctx, nc, kp, subjects.DeviceFacts(id), model.PurposeEvent, facts)
	if err == nil || !permanentPublishError(err) || !strings.Contains(err.Error(), "signature") {
		t.Fatalf("facts signed as an event: %v", err)
	}

	mu.Lock()
	reply = []byte("not json")
	mu.Unlock()
	err = sendReport(ctx, nc, kp, subjects.DeviceFacts(id), model.PurposeFacts, facts)
	if err == nil || permanentPublishError(err) {
		t.Fatalf("undecodable ack: %v", err)
	}

	// A payload that is not JSON cannot be signed and never will be.
	if err := sendReport(ctx, nc, kp, subjects.DeviceFacts(id), model.PurposeFacts, []byte("{")); !permanentPublishError(err) {
		t.Fatalf("payload that is not JSON: %v", err)
	}
}

// getDesired asks on the device's own request subject and parses the
// coordinator's answer.
func TestGetDesiredAsksCoordinator(t *testing.T) {
	nc, coord := natsPair(t)
	_, id := deviceKey(t)
	ctx := context.Background()
	if _, err := getDesired(ctx, nc, id); !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("no coordinator: %v", err)
	}
	var (
		mu  sync.Mutex
		ans model.DesiredReply
	)
	_, err := coord.Subscribe(subjects.DesiredGetFor(id), func(m *nats.Msg) {
		mu.Lock()
		a := ans
		mu.Unlock()
		respondJSON(t, m, a)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := coord.Flush(); err != nil {
		t.Fatal(err)
	}
	set := func(r model.DesiredReply) {
		mu.Lock()
		ans = r
		mu.Unlock()
	}
	set(model.DesiredReply{Seq: 4, Desired: json.RawMessage(`{"release_id":"r1","store_path":"/nix/store/x"}`)})
	m, err := getDesired(ctx, nc, id)
	if err != nil || m.Seq != 4 || m.Desired == nil || m.Desired.ReleaseID != "r1" {
		t.Fatalf("desired: %+v %v", m, err)
	}
	set(model.DesiredReply{})
	if m, err := getDesired(ctx, nc, id); err != nil || !m.Absent {
		t.Fatalf("none: %+v %v", m, err)
	}
	set(model.DesiredReply{Error: "read desired state: timeout"})
	if _, err := getDesired(ctx, nc, id); err == nil || !strings.Contains(err.Error(), "timeout") {
		t.Fatalf("coordinator error: %v", err)
	}
}

// A paced progress event (model.Pace) waits its time: the apply's next
// event takes its place, so a quick apply reports its result alone, while
// a slow step is still reported, once its wait is over. A result is never
// held.
func TestReporterPacesProgress(t *testing.T) {
	r, d, id := storingReporter(t, true)
	const wait = 300 * time.Millisecond
	add := func(attempt string, st model.State, res model.Result) time.Time {
		t.Helper()
		ev := model.Event{Device: id, Time: time.Now().UTC(), State: st, Result: res, Attempt: attempt}
		notBefore := time.Now().Add(wait)
		if err := r.enqueue(subjects.DeviceEvents(id), model.EventMsgID(&ev), ev, notBefore); err != nil {
			t.Fatal(err)
		}
		return notBefore
	}
	next := func(what string) model.Event {
		t.Helper()
		select {
		case ev := <-d.stored:
			return ev
		case <-time.After(10 * time.Second):
			t.Fatalf("no event stored: want %s", what)
			return model.Event{}
		}
	}

	// A quick apply: its result alone.
	add("quick", model.StateChecking, "")
	add("quick", model.StateFetching, "")
	add("quick", model.StateReporting, model.ResultSucceeded)
	if ev := next("the quick apply's result"); ev.Attempt != "quick" || ev.Result != model.ResultSucceeded {
		t.Fatalf("first event stored: %+v, want the quick apply's result", ev)
	}

	// A slow step: reported once its wait is over, not before.
	due := add("slow", model.StateFetching, "")
	ev := next("the slow apply's fetching")
	if ev.Attempt != "slow" || ev.State != model.StateFetching {
		t.Fatalf("event stored: %+v, want the slow apply's fetching", ev)
	}
	if now := time.Now(); now.Before(due) {
		t.Fatalf("the held event was sent %v before its time", due.Sub(now))
	}
	add("slow", model.StateReporting, model.ResultFailed)
	if ev := next("the slow apply's result"); ev.Attempt != "slow" || ev.Result != model.ResultFailed {
		t.Fatalf("event stored: %+v, want the slow apply's result", ev)
	}
	if got, _ := d.received(); len(got) != 3 {
		t.Fatalf("the coordinator got %d events, want 3: %+v", len(got), got)
	}
}

// A command event queued behind a held progress event does not wait for
// it: it is another report altogether (a reboot's "reboot starting" has
// 10 s to leave before the host goes down).
func TestReporterHeldProgressLetsOthersGo(t *testing.T) {
	r, d, id := storingReporter(t, true)
	prog := model.Event{Device: id, Time: time.Now().UTC(), State: model.StateFetching, Attempt: "apply1"}
	if err := r.enqueue(subjects.DeviceEvents(id), model.EventMsgID(&prog), prog, time.Now().Add(model.MaxProgressAfter)); err != nil {
		t.Fatal(err)
	}
	cmd := model.Event{Device: id, Time: time.Now().UTC(), State: model.StateCommand, Result: model.CommandDone,
		Command: "c1", Attempt: "c1", Check: string(model.CommandReboot)}
	sent := time.Now()
	if err := r.enqueue(subjects.DeviceEvents(id), model.EventMsgID(&cmd), cmd, time.Time{}); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-d.stored:
		if ev.State != model.StateCommand {
			t.Fatalf("first event stored: %+v, want the command's", ev)
		}
	case <-time.After(2 * time.Second):
		t.Fatalf("the command event waited %v (and counting) behind a held progress event", time.Since(sent))
	}
}

// A clean stop flushes what is queued, held progress events too: progress
// and command events live in memory only.
func TestReporterFlushSendsHeldProgress(t *testing.T) {
	r, d, id := storingReporter(t, false)
	prog := model.Event{Device: id, Time: time.Now().UTC(), State: model.StateApplying, Attempt: "apply1"}
	if err := r.enqueue(subjects.DeviceEvents(id), model.EventMsgID(&prog), prog, time.Now().Add(5*time.Second)); err != nil {
		t.Fatal(err)
	}
	cmd := model.Event{Device: id, Time: time.Now().UTC(), State: model.StateCommand, Result: model.CommandDone,
		Command: "c1", Attempt: "c1", Check: "refresh-facts"}
	if err := r.enqueue(subjects.DeviceEvents(id), model.EventMsgID(&cmd), cmd, time.Time{}); err != nil {
		t.Fatal(err)
	}
	fctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	r.flush(fctx)
	if got, _ := d.received(); len(got) != 2 {
		t.Fatalf("flush sent %d of 2 queued events (queue left: %v); the rest are lost with the process", len(got), queueIDs(r))
	}
}

// storingReporter is a reporter of a new device key whose events a
// coordinator stand-in verifies and stores; with run, it is running.
func storingReporter(t *testing.T, run bool) (*reporter, *eventDesk, string) {
	t.Helper()
	nc, coord := natsPair(t)
	kp, id := deviceKey(t)
	d := serveEvents(t, coord, id)
	d.setAck(model.ReportAck{Seq: 1})
	r, err := newReporter(t.TempDir(), nc, kp, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	if run {
		ctx, cancel := context.WithCancel(context.Background())
		t.Cleanup(cancel)
		go r.run(ctx)
	}
	return r, d, id
}
