package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
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

// ParseDesired reads a direct-get reply or a republished message. Status
// 404 (direct get of an absent key) and KV delete or purge markers mean no
// desired state; other statuses are errors. A body that is not a Desired is
// returned with Err set, not as an error, so it is reported.
func ParseDesired(h nats.Header, data []byte) (DesiredMsg, error) {
	var m DesiredMsg
	if st := h.Get("Status"); st != "" {
		if st == "404" {
			m.Absent = true
			return m, nil
		}
		return m, fmt.Errorf("desired state: server answered status %s %s", st, h.Get("Description"))
	}
	if s := h.Get(nats.JSSequence); s != "" {
		seq, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return m, fmt.Errorf("desired state: bad sequence header %q", s)
		}
		m.Seq = seq
	}
	switch strings.ToUpper(h.Get("KV-Operation")) {
	case "DEL", "PURGE":
		m.Absent = true
		return m, nil
	}
	if len(data) == 0 {
		m.Absent = true
		return m, nil
	}
	var d model.Desired
	if err := json.Unmarshal(data, &d); err != nil {
		m.Err = fmt.Errorf("desired state is not valid JSON: %w", err)
		return m, nil
	}
	m.Desired = &d
	return m, nil
}

// getDesired direct-gets the device's own key. Agents may not read stream
// info, so this is a raw request, not the KV API.
func getDesired(ctx context.Context, nc *nats.Conn, domain, id string) (DesiredMsg, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	msg, err := nc.RequestWithContext(ctx, subjects.DesiredDirectGet(domain, id), nil)
	if err != nil {
		return DesiredMsg{}, fmt.Errorf("direct get of desired state: %w", err)
	}
	return ParseDesired(msg.Header, msg.Data)
}
