package broker

import (
	"fmt"
	"hash/fnv"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"fleet/subjects"
)

// deviceLanes is how many pairs of in-process connections carry device
// traffic. One connection is one reader and one writer in the server: a
// whole fleet's reports, acknowledgements and triggers through a single
// one wait in line behind each other however many handlers run. Lanes
// share the queue group, so the server spreads the fleet over them.
const deviceLanes = 4

// lane is one FLEET connection that takes device messages and answers
// them, and the CORE connection that stores what they carry.
type lane struct {
	fc *nats.Conn
	nc *nats.Conn
	js jetstream.JetStream
}

// openLanes connects the coordinator's device lanes.
func (s *services) openLanes() error {
	for i := range deviceLanes {
		name := fmt.Sprintf("fleet-coordinator-devices-%d", i)
		svc, err := s.c.auth.ServiceUser(name)
		if err != nil {
			return err
		}
		core, err := s.c.auth.CoreUser(name + "-core")
		if err != nil {
			return err
		}
		l := &lane{}
		if l.fc, err = s.c.InProcessConn(svc, name); err != nil {
			return err
		}
		if l.nc, err = s.c.InProcessConn(core, name+"-core"); err != nil {
			l.fc.Close()
			return err
		}
		if l.js, err = jetstream.New(l.nc, jetstream.WithPublishAsyncMaxPending(8192)); err != nil {
			l.fc.Close()
			l.nc.Close()
			return fmt.Errorf("jetstream: %w", err)
		}
		s.lanes = append(s.lanes, l)
		// Triggers have connections of their own: a batch of a fleet's
		// triggers does not queue behind the replies of a lane.
		nc, err := s.c.InProcessConn(svc, name+"-notify")
		if err != nil {
			return err
		}
		s.notifiers = append(s.notifiers, nc)
	}
	return nil
}

// closeLanes closes the lanes once no handler uses them.
func (s *services) closeLanes() {
	for _, l := range s.lanes {
		_ = l.fc.Flush()
		l.fc.Close()
		l.nc.Close()
	}
	for _, nc := range s.notifiers {
		_ = nc.Flush()
		nc.Close()
	}
}

// laneIndex spreads device IDs over n connections, each ID always on the
// same one.
func laneIndex(id string, n int) int {
	h := fnv.New32a()
	_, _ = h.Write([]byte(id))
	return int(h.Sum32() % uint32(n))
}

// subscribeLanes subscribes handler h to subj in the coordinators' queue
// group on every lane's FLEET connection (core: its CORE connection).
func (s *services) subscribeLanes(subj string, core bool, h func(l *lane, m *nats.Msg)) error {
	for _, l := range s.lanes {
		nc := l.fc
		if core {
			nc = l.nc
		}
		sub, err := nc.QueueSubscribe(subj, subjects.CoordinatorQueue, func(m *nats.Msg) { h(l, m) })
		if err != nil {
			return fmt.Errorf("subscribe %s: %w", subj, err)
		}
		// A burst of a whole fleet's reports must wait, not be dropped by
		// the client library.
		if err := sub.SetPendingLimits(-1, 256<<20); err != nil {
			return fmt.Errorf("subscribe %s: %w", subj, err)
		}
		s.subs = append(s.subs, sub)
	}
	return nil
}
