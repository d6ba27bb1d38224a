package model

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"time"
)

// Purposes of what a device signs. Facts and events are signed with the
// device key, so nothing between the device and the coordinator (a site's
// leaf node, another device) can forge or alter them.
const (
	PurposeFacts = "fleet.facts.v1"
	PurposeEvent = "fleet.event.v1"
)

// Size limits of what a device sends, checked by the coordinator before
// anything is stored. An event carries at most a MaxEventLog tail.
const (
	MaxFactsBytes = 128 << 10
	MaxEventBytes = 32 << 10
)

// ReportAck answers a device's facts or event: the stream sequence it was
// stored at, or why not. Permanent errors will not change on a retry (the
// report is malformed or too large); the agent drops such a report.
type ReportAck struct {
	Seq       uint64 `json:"seq,omitempty"`
	Duplicate bool   `json:"duplicate,omitempty"`
	Error     string `json:"error,omitempty"`
	Permanent bool   `json:"permanent,omitempty"`
}

// EventMsgID is the deduplication ID of an event: one per apply attempt,
// state and result, so a resumed apply's repeated events are stored once.
func EventMsgID(ev *Event) string {
	return ev.Attempt + "-" + string(ev.State) + "-" + string(ev.Result)
}

// ParseEvent decodes a signed event and checks that device signed it about
// itself.
func ParseEvent(b []byte, device string) (*Event, error) {
	var ev Event
	if err := parseReport(b, device, PurposeEvent, MaxEventBytes, &ev); err != nil {
		return nil, err
	}
	if ev.Device != device {
		return nil, fmt.Errorf("event names device %q, not its signer %s", ev.Device, device)
	}
	if ev.Time.IsZero() || ev.State == "" {
		return nil, errors.New("event lacks time or state")
	}
	if ev.Cache != nil {
		if err := ev.Cache.Check(); err != nil {
			return nil, err
		}
	}
	return &ev, nil
}

// ParseFacts decodes signed facts and checks that device signed them about
// itself.
func ParseFacts(b []byte, device string) (*Facts, error) {
	var f Facts
	if err := parseReport(b, device, PurposeFacts, MaxFactsBytes, &f); err != nil {
		return nil, err
	}
	if f.Device != device {
		return nil, fmt.Errorf("facts name device %q, not their signer %s", f.Device, device)
	}
	return &f, nil
}

// ErrReportTooLarge is returned for a report over its size limit.
var ErrReportTooLarge = errors.New("report too large")

func parseReport(b []byte, device, purpose string, limit int, v any) error {
	if len(b) > limit+1024 {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrReportTooLarge, len(b), limit)
	}
	var s Signed
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("not a signed report: %w", err)
	}
	if len(s.Payload) > limit {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrReportTooLarge, len(s.Payload), limit)
	}
	if err := s.Verify(purpose, []string{device}); err != nil {
		return fmt.Errorf("report signature: %w", err)
	}
	if err := s.Decode(v); err != nil {
		return err
	}
	// What is stored is what every reader sees: strip what a terminal
	// would act on once, here.
	cleanStrings(reflect.ValueOf(v))
	return nil
}

// DesiredReply answers a device's request for its desired state: the
// fleet_desired entry's revision and value (Desired nil: none), or an error.
// The trigger of a change carries the same, the entry just written.
type DesiredReply struct {
	Seq     uint64          `json:"seq,omitempty"`
	Desired json.RawMessage `json:"desired,omitempty"`
	// Damaged says why the stored value cannot be sent (not JSON): the
	// device reports it as a failed apply, once.
	Damaged string `json:"damaged,omitempty"`
	Error   string `json:"error,omitempty"`
	// Pace is set on the triggers of a large batch (see Pace).
	Pace *Pace `json:"pace,omitempty"`
}

// Pace tells the devices of a large rollout batch how to spread the
// reports of their apply, so that thousands told at once do not report
// at once while the rest of the batch is still being told and its
// results are coming in: a progress event is sent only once it has waited
// ProgressAfterMS (an apply quicker than that reports its result alone;
// a slow one still shows each step, that much later), and the facts that
// follow an apply come at a random moment within FactsSplayMS. It only
// delays reports, never drops a result, and a device bounds both.
type Pace struct {
	ProgressAfterMS int64 `json:"progress_after_ms,omitempty"`
	FactsSplayMS    int64 `json:"facts_splay_ms,omitempty"`
}

// The most a device delays its reports for a Pace.
const (
	MaxProgressAfter = 10 * time.Second
	MaxFactsSplay    = 2 * time.Minute
)

// ProgressAfter is how long a progress event waits, bounded.
func (p *Pace) ProgressAfter() time.Duration {
	if p == nil {
		return 0
	}
	return clampMS(p.ProgressAfterMS, MaxProgressAfter)
}

// FactsSplay is the window the facts after an apply are sent in, bounded.
func (p *Pace) FactsSplay() time.Duration {
	if p == nil {
		return 0
	}
	return clampMS(p.FactsSplayMS, MaxFactsSplay)
}

func clampMS(ms int64, most time.Duration) time.Duration {
	if ms <= 0 {
		return 0
	}
	return time.Duration(min(ms, int64(most/time.Millisecond))) * time.Millisecond
}
