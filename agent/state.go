package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"fleet/accounts"
	"fleet/model"
)

// StateFile in STATE_DIR holds the apply in progress and the last result,
// so an agent restarted mid-apply (by the switch itself, a crash or
// kill -9) finishes or rolls back and reports once.
const StateFile = "state.json"

// Phase is where a persisted apply stands.
type Phase string

const (
	PhaseNone        Phase = ""
	PhaseSwitching   Phase = "switching"
	PhaseVerifying   Phase = "verifying"
	PhaseRollingBack Phase = "rolling_back"
)

// ApplyState is the content of StateFile.
type ApplyState struct {
	Phase   Phase     `json:"phase,omitempty"`
	Attempt string    `json:"attempt,omitempty"`
	Started time.Time `json:"started,omitzero"`
	// Target is the desired state being applied.
	RolloutID string       `json:"rollout_id,omitempty"`
	ReleaseID string       `json:"release_id,omitempty"`
	StorePath string       `json:"store_path,omitempty"`
	Action    model.Action `json:"action,omitempty"`
	// Key identifies the desired state being applied (DesiredMsg.Key).
	Key string `json:"key,omitempty"`
	// Prev is what was running before, for rollback.
	Prev Generation `json:"prev"`
	// Error is why a rollback started (for its final event).
	Error string `json:"error,omitempty"`
	Check string `json:"check,omitempty"`
	Log   string `json:"log,omitempty"`

	// LastKey identifies the last desired state handled to the end; the
	// same desired state again is a no-op.
	LastKey string           `json:"last_key,omitempty"`
	Last    *model.LastApply `json:"last,omitempty"`
	// Statement is what the device remembers of the admin statements
	// behind what it accepted: nothing older is taken (rollback
	// protection).
	Statement model.Statement `json:"statement,omitzero"`
}

// LoadState reads STATE_DIR/state.json; a missing file is an empty state.
func LoadState(dir string) (*ApplyState, error) {
	var st ApplyState
	b, err := os.ReadFile(filepath.Join(dir, StateFile))
	if errors.Is(err, fs.ErrNotExist) {
		return &st, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read apply state: %w", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("apply state %s is damaged (%w); remove it to start afresh (an apply it records as interrupted will then neither resume nor roll back; check the running system)", filepath.Join(dir, StateFile), err)
	}
	return &st, nil
}

// SaveState writes st atomically (temp file, fsync, rename, fsync dir), so
// a crash leaves the old or the new state, never half of one.
func SaveState(dir string, st *ApplyState) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode apply state: %w", err)
	}
	return accounts.WriteSecretFile(filepath.Join(dir, StateFile), b)
}
