package broker

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"fleet/subjects"
)

// The MDM duties' verbs (remote commands, sealed payloads, recovery-key
// escrow), added to the admin API by startAPI.
func (s *services) mdmVerbs() []apiVerb {
	return append(append([]apiVerb{s.commandVerb()}, s.payloadVerbs()...), s.escrowVerbs()...)
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
	for subj, h := range map[string]nats.MsgHandler{
		subjects.AllPayloadSync: s.onPayloadSync,
		subjects.AllEscrowPut:   s.onEscrowSync,
	} {
		sub, err := s.c.fc.QueueSubscribe(subj, subjects.CoordinatorQueue, h)
		if err != nil {
			return fmt.Errorf("subscribe %s: %w", subj, err)
		}
		s.subs = append(s.subs, sub)
	}
	return nil
}
