package model

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Strategy is how a rollout splits its devices into batches.
type Strategy string

const (
	// StrategyAll: one batch with every device.
	StrategyAll Strategy = "all"
	// StrategyCanary: one device first, then everyone.
	StrategyCanary Strategy = "canary"
	// StrategyStaged: the batches given with --batches.
	StrategyStaged Strategy = "staged"
)

// DefaultBatches returns the batch spec a strategy uses when none is given.
func DefaultBatches(s Strategy) string {
	switch s {
	case StrategyAll:
		return "100%"
	case StrategyCanary:
		return "1,100%"
	default:
		return "1,10%,50%,100%"
	}
}

// ParseStrategy checks s; "" means staged.
func ParseStrategy(s string) (Strategy, error) {
	switch Strategy(s) {
	case "":
		return StrategyStaged, nil
	case StrategyAll, StrategyCanary, StrategyStaged:
		return Strategy(s), nil
	}
	return "", fmt.Errorf("unknown strategy %q (use all, canary or staged)", s)
}

// OnFailure is what a rollout does when failures pass its threshold.
type OnFailure string

const (
	OnFailurePause  OnFailure = "pause"
	OnFailureRevert OnFailure = "revert"
)

// ParseOnFailure checks s; "" means pause.
func ParseOnFailure(s string) (OnFailure, error) {
	switch OnFailure(s) {
	case "":
		return OnFailurePause, nil
	case OnFailurePause, OnFailureRevert:
		return OnFailure(s), nil
	}
	return "", fmt.Errorf("unknown --on-failure %q (use pause or revert)", s)
}

// Quantity is a device count or a percentage of the rollout's devices.
type Quantity struct {
	N       int     `json:"n,omitempty"`
	Percent float64 `json:"percent,omitempty"`
}

func (q Quantity) String() string {
	if q.Percent > 0 {
		return strconv.FormatFloat(q.Percent, 'f', -1, 64) + "%"
	}
	return strconv.Itoa(q.N)
}

// Of resolves q against total devices. A percentage rounds up, so "10%" of
// three devices is one device, never zero.
func (q Quantity) Of(total int) int {
	if q.Percent > 0 {
		return min(total, int(math.Ceil(q.Percent*float64(total)/100-1e-9)))
	}
	return min(total, q.N)
}

// ParseQuantity parses "5" or "10%".
func ParseQuantity(s string) (Quantity, error) {
	s = strings.TrimSpace(s)
	if p, ok := strings.CutSuffix(s, "%"); ok {
		f, err := strconv.ParseFloat(p, 64)
		if err != nil || math.IsNaN(f) || f < 0 || f > 100 {
			return Quantity{}, fmt.Errorf("%q: a percentage is 0%% to 100%%", s)
		}
		return Quantity{Percent: f}, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return Quantity{}, fmt.Errorf("%q is neither a device count nor a percentage (e.g. 5 or 10%%)", s)
	}
	return Quantity{N: n}, nil
}

// ParseBatches parses a batch spec like "1,10%,100%". Each entry is the
// cumulative share of devices reached once that batch is done, so entries
// must grow; a spec that stops short of every device gets a last "100%".
func ParseBatches(spec string) ([]Quantity, error) {
	if strings.TrimSpace(spec) == "" {
		return nil, errors.New("--batches is empty (e.g. 1,10%,100%)")
	}
	var out []Quantity
	for _, part := range strings.Split(spec, ",") {
		q, err := ParseQuantity(part)
		if err != nil {
			return nil, fmt.Errorf("--batches: %w", err)
		}
		if q.N == 0 && q.Percent == 0 {
			return nil, fmt.Errorf("--batches: a batch of %q devices reaches nobody", strings.TrimSpace(part))
		}
		// Entries are cumulative, so each must reach further than the last
		// of its kind (counts and percentages compare only at deploy time).
		for _, prev := range out {
			if prev.Percent > 0 && q.Percent > 0 && q.Percent <= prev.Percent || prev.N > 0 && q.N > 0 && q.N <= prev.N {
				return nil, fmt.Errorf("--batches %q: entries are cumulative and must grow (%s after %s)", spec, q, prev)
			}
		}
		out = append(out, q)
	}
	if last := out[len(out)-1]; last.Percent != 100 {
		out = append(out, Quantity{Percent: 100})
	}
	return out, nil
}

// BatchSizes splits total devices along batches: the number of new devices
// in each batch. Batches that add nobody (e.g. "1,10%" of 5 devices) are
// dropped.
func BatchSizes(batches []Quantity, total int) []int {
	var sizes []int
	reached := 0
	for _, b := range batches {
		upTo := b.Of(total)
		if upTo > reached {
			sizes = append(sizes, upTo-reached)
			reached = upTo
		}
	}
	return sizes
}

// RolloutState is a rollout's state.
type RolloutState string

const (
	RolloutPending   RolloutState = "pending"
	RolloutRunning   RolloutState = "running"
	RolloutPaused    RolloutState = "paused"
	RolloutSucceeded RolloutState = "succeeded"
	RolloutFailed    RolloutState = "failed"
	RolloutAborted   RolloutState = "aborted"
	RolloutReverted  RolloutState = "reverted"
	// RolloutReverting: an operator asked to undo it (rollout undo, abort
	// --revert); the engine sets its devices back, then marks it reverted.
	RolloutReverting RolloutState = "reverting"
)

// Finished reports whether s is final.
func (s RolloutState) Finished() bool {
	switch s {
	case RolloutSucceeded, RolloutFailed, RolloutAborted, RolloutReverted:
		return true
	}
	return false
}

// DeviceRolloutState is one device's progress in a rollout.
type DeviceRolloutState string

const (
	// DeviceQueued: its batch has not started.
	DeviceQueued DeviceRolloutState = "queued"
	// DeviceWaiting: desired state written, waiting for the agent's result.
	DeviceWaiting    DeviceRolloutState = "waiting"
	DeviceSucceeded  DeviceRolloutState = "succeeded"
	DeviceFailed     DeviceRolloutState = "failed"
	DeviceTimedOut   DeviceRolloutState = "timed_out"
	DeviceSkipped    DeviceRolloutState = "skipped"
	DeviceReverted   DeviceRolloutState = "reverted"
	DeviceSuperseded DeviceRolloutState = "superseded"
)

// DeviceRolloutStates lists every device state (for metrics).
var DeviceRolloutStates = []DeviceRolloutState{DeviceQueued, DeviceWaiting, DeviceSucceeded, DeviceFailed, DeviceTimedOut, DeviceSkipped, DeviceReverted, DeviceSuperseded}

// Failed reports whether s counts against the failure threshold.
func (s DeviceRolloutState) Failed() bool { return s == DeviceFailed || s == DeviceTimedOut }

// Done reports whether the device needs nothing more in this rollout.
func (s DeviceRolloutState) Done() bool {
	return s != DeviceQueued && s != DeviceWaiting
}

// Rollout is a rollout's summary, key <id> in fleet_rollouts. Each device's
// progress is a RolloutDevice under <id>.<device>, so a rollout over ten
// thousand devices never rewrites one large document.
type Rollout struct {
	ID        string    `json:"id"`
	ReleaseID string    `json:"release_id"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
	// CreatedBy is the admin key that asked for it; Request is its signed
	// deploy request, which every desired state of the rollout carries.
	CreatedBy string  `json:"created_by,omitempty"`
	Request   *Signed `json:"request,omitempty"`
	Group     string  `json:"group,omitempty"`
	// Groups are the target devices' groups: who may act on the rollout.
	Groups []string `json:"groups,omitempty"`
	// Kind is "" for an admin's deploy, KindConverge for the coordinator
	// bringing devices to their group's target or pin.
	Kind string `json:"kind,omitempty"`
	// Sample is the random cohort drawn from the target (deploy --sample),
	// with its seed: the same seed over the same devices draws the same
	// cohort.
	Sample string `json:"sample,omitempty"`
	Seed   uint64 `json:"seed,omitempty"`
	// Replaced is the group's target before this rollout set it (nil: it
	// had none, or the rollout sets none): what an undo restores.
	Replaced *GroupTarget `json:"replaced,omitempty"`
	// SetsTarget: the rollout covers its whole group, so on success the
	// group's target becomes its release.
	SetsTarget bool `json:"sets_target,omitempty"`
	// Undo is the operator's signed undo (rollout undo, abort --revert):
	// each reverted device's desired state carries it.
	Undo *Signed `json:"undo,omitempty"`

	Strategy      Strategy   `json:"strategy"`
	Batches       []Quantity `json:"batches"`
	BatchSizes    []int      `json:"batch_sizes"`
	MaxFailures   Quantity   `json:"max_failures"`
	HealthTimeout Duration   `json:"health_timeout"`
	OnFailure     OnFailure  `json:"on_failure"`

	State RolloutState `json:"state"`
	// Batch is the index of the current batch.
	Batch int `json:"batch"`
	// BatchStarted is when the current batch's desired states were written.
	BatchStarted time.Time `json:"batch_started,omitzero"`
	Reason       string    `json:"reason,omitempty"`
	// Total is the number of target devices; their progress lives under
	// <id>.<device> keys, not in this summary, which stays small whatever
	// the fleet's size.
	Total int `json:"total"`
	// Skipped lists hosts the release has no closure for.
	Skipped []string `json:"skipped,omitempty"`
	// Counts per device state, kept with every transition for cheap listing.
	Counts map[DeviceRolloutState]int `json:"counts"`
}

// KindConverge marks a rollout the coordinator made to bring devices to
// their group's target or their pin.
const KindConverge = "converge"

// RolloutDevice is one device's progress in a rollout.
type RolloutDevice struct {
	Device    string             `json:"device"`
	Name      string             `json:"name"`
	Batch     int                `json:"batch"`
	State     DeviceRolloutState `json:"state"`
	StorePath string             `json:"store_path,omitempty"`
	Error     string             `json:"error,omitempty"`
	// Previous is the desired state the device had before this rollout
	// (a Desired as it was stored), restored on revert (empty: it had
	// none). Kept as stored: a deploy to a whole fleet copies each
	// device's, where decoding and encoding them would be most of its
	// work.
	Previous json.RawMessage `json:"previous,omitempty"`
	Started  time.Time       `json:"started,omitzero"`
	Finished time.Time       `json:"finished,omitzero"`
}

// Duration is a time.Duration that reads and writes as "5m0s".
type Duration time.Duration

func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(strconv.Quote(time.Duration(d).String())), nil
}

func (d *Duration) UnmarshalJSON(b []byte) error {
	s, err := strconv.Unquote(string(b))
	if err != nil {
		return fmt.Errorf("duration must be a string like \"5m\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

var rolloutIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`)

// CheckRolloutID reports whether id can name a rollout (a KV key token).
func CheckRolloutID(id string) error {
	if !rolloutIDRE.MatchString(id) {
		return fmt.Errorf("rollout id %q: use letters, digits, - and _", id)
	}
	return nil
}

// PreviousDesired decodes d.Previous (nil when the device had none).
func (d *RolloutDevice) PreviousDesired() (*Desired, error) {
	if len(d.Previous) == 0 || string(d.Previous) == "null" {
		return nil, nil
	}
	var prev Desired
	if err := json.Unmarshal(d.Previous, &prev); err != nil {
		return nil, fmt.Errorf("previous desired state of %s: %w", d.Name, err)
	}
	return &prev, nil
}

// DesiredRef is what a stored desired state names, read without decoding
// the signed release and statement it carries.
type DesiredRef struct {
	ReleaseID string `json:"release_id"`
	RolloutID string `json:"rollout_id,omitempty"`
	StorePath string `json:"store_path"`
}
