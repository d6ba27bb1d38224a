package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"

	"fleet/model"
	"fleet/subjects"
)

// DesiredMsg is one reading of the device's desired state, from a direct
// get or from the KV's RePublish.
type DesiredMsg struct {
	// Seq is the KV stream sequence; a higher one is newer.
	Seq uint64
	// Absent: no desired state (never set, deleted or purged).
	Absent  bool
	Desired *model.Desired
	// Err says why the value could not be read; it is reported once.
	Err error
	// Pace is how to spread the apply's reports (a trigger of a large
	// batch); nil reports as it goes.
	Pace *model.Pace
}

// Key identifies the desired state, so the same one twice is a no-op.
func (m *DesiredMsg) Key() string {
	if m.Desired == nil {
		return "seq:" + strconv.FormatUint(m.Seq, 10)
	}
	d := m.Desired
	// IssuedAt is part of it: a coordinator that writes the same release
	// again (a resumed rollout retrying a failed device) asks for a new try.
	return d.RolloutID + "|" + d.ReleaseID + "|" + d.StorePath + "|" + strconv.FormatInt(d.IssuedAt.UnixNano(), 10)
}

// ParseDesired reads the coordinator's answer to a desired-state request:
// the entry's revision and value, none, or an error. A value that is not a
// Desired is returned with Err set, not as an error, so it is reported.
func ParseDesired(data []byte) (DesiredMsg, error) {
	var m DesiredMsg
	var r model.DesiredReply
	if err := json.Unmarshal(data, &r); err != nil {
		return m, fmt.Errorf("desired state: the reply does not decode: %w", err)
	}
	if r.Error != "" {
		return m, fmt.Errorf("desired state: coordinator: %s", r.Error)
	}
	m.Seq, m.Pace = r.Seq, r.Pace
	if r.Damaged != "" {
		m.Err = fmt.Errorf("desired state is not valid JSON: %s", r.Damaged)
		return m, nil
	}
	if len(r.Desired) == 0 || string(r.Desired) == "null" {
		m.Absent = true
		return m, nil
	}
	var d model.Desired
	if err := json.Unmarshal(r.Desired, &d); err != nil {
		m.Err = fmt.Errorf("desired state is not valid JSON: %w", err)
		return m, nil
	}
	m.Desired = &d
	return m, nil
}

// getDesired asks the coordinator for the device's own desired state; the
// answer comes only into this device's inbox.
func getDesired(ctx context.Context, nc *nats.Conn, id string) (DesiredMsg, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	msg, err := nc.RequestWithContext(ctx, subjects.DesiredGetFor(id), nil)
	if err != nil {
		return DesiredMsg{}, fmt.Errorf("read desired state: %w", err)
	}
	return ParseDesired(msg.Data)
}
