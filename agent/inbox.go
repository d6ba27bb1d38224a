package agent

import (
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
)

// deviceInbox routes what the coordinator sends into the device's own
// inbox (desired-state triggers, commands, the MDM's kicks: one token
// under the inbox prefix each) from one wildcard subscription to the
// handler of each subject. One subscription rather than one per kind: the
// server keeps every subscription of every connection, with its entries
// in the account's subject tree, and a coordinator holds the connections
// of the whole fleet. Replies use two tokens or more under the prefix
// (nats.go's request mux, the caches' inboxes), so none reach it.
type deviceInbox struct {
	log      zerolog.Logger
	mu       sync.RWMutex
	handlers map[string]nats.MsgHandler
}

// handle routes subject's messages to h until the returned stop is called
// (a call of h under way may finish after it: handlers hand their work on
// and return). A message for a subject nobody handles is dropped, as it
// would be with no subscription.
func (b *deviceInbox) handle(subject string, h nats.MsgHandler) (stop func()) {
	b.mu.Lock()
	if b.handlers == nil {
		b.handlers = map[string]nats.MsgHandler{}
	}
	b.handlers[subject] = h
	b.mu.Unlock()
	return func() {
		b.mu.Lock()
		delete(b.handlers, subject)
		b.mu.Unlock()
	}
}

// dispatch is the subscription's handler. Handlers run on the
// subscription's one goroutine, in arrival order: each hands its work on
// and returns.
func (b *deviceInbox) dispatch(m *nats.Msg) {
	b.mu.RLock()
	h := b.handlers[m.Subject]
	b.mu.RUnlock()
	if h == nil {
		// A reply on one token under the prefix would land here as well
		// as in its own subscription: twice on the wire.
		b.log.Debug().Str("subject", m.Subject).Msg("inbox message nobody handles; dropped")
		return
	}
	h(m)
}
