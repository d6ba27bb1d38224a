package broker

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// bulkWindow is how many of a bulk write's publishes may await their acks
// at once: enough to keep the stream busy, far below the client's own
// limit, where nats.go would stall and fail the publish.
const bulkWindow = 512

// bulkMsg is one message of a bulk write.
type bulkMsg struct {
	subj   string
	data   []byte
	header nats.Header
	opts   []jetstream.PublishOpt
}

// publishBulk stores msgs with async publishes, a window of them in flight,
// and returns each one's ack or error (index for index). It never fails a
// message for being one too many: it waits for acks instead. A message
// not acknowledged when ctx ends gets ctx's error.
func publishBulk(ctx context.Context, js jetstream.JetStream, msgs []bulkMsg) ([]*jetstream.PubAck, []error) {
	return publishBulkEach(ctx, js, msgs, nil)
}

// publishBulkEach is publishBulk that also calls stored (when not nil) with
// each message the stream acknowledged, on the calling goroutine, as the
// acks come: whatever depends on one message's write need not wait for
// the whole batch.
func publishBulkEach(ctx context.Context, js jetstream.JetStream, msgs []bulkMsg, stored func(i int, ack *jetstream.PubAck)) ([]*jetstream.PubAck, []error) {
	acks := make([]*jetstream.PubAck, len(msgs))
	errs := make([]error, len(msgs))
	type pending struct {
		i int
		f jetstream.PubAckFuture
	}
	var window []pending
	wait := func(p pending) {
		select {
		case a := <-p.f.Ok():
			acks[p.i] = a
			if stored != nil {
				stored(p.i, a)
			}
		case err := <-p.f.Err():
			errs[p.i] = err
		case <-ctx.Done():
			errs[p.i] = ctx.Err()
		}
	}
	for i, m := range msgs {
		for len(window) >= bulkWindow {
			wait(window[0])
			window = window[1:]
		}
		if err := ctx.Err(); err != nil {
			errs[i] = err
			continue
		}
		msg := &nats.Msg{Subject: m.subj, Data: m.data, Header: m.header}
		f, err := js.PublishMsgAsync(msg, m.opts...)
		for errors.Is(err, jetstream.ErrTooManyStalledMsgs) && len(window) > 0 {
			// Someone else shares the client's window: wait for ours.
			wait(window[0])
			window = window[1:]
			f, err = js.PublishMsgAsync(msg, m.opts...)
		}
		if err != nil {
			errs[i] = err
			continue
		}
		window = append(window, pending{i, f})
	}
	for _, p := range window {
		wait(p)
	}
	return acks, errs
}

// firstError is the first of errs, naming its message with what.
func firstError(errs []error, what func(i int) string) error {
	for i, err := range errs {
		if err != nil {
			return fmt.Errorf("%s: %w", what(i), err)
		}
	}
	return nil
}
