package model

import (
	"fmt"
	"time"
)

// State is an agent's reconcile state (DESIGN §4).
type State string

const (
	StateIdle        State = "idle"
	StateChecking    State = "checking"
	StateFetching    State = "fetching"
	StateApplying    State = "applying"
	StateVerifying   State = "verifying"
	StateReporting   State = "reporting"
	StateRollingBack State = "rolling_back"
)

// States lists every state, in reconcile order.
var States = []State{StateIdle, StateChecking, StateFetching, StateApplying, StateVerifying, StateReporting, StateRollingBack}

// Result is the outcome of one apply.
type Result string

const (
	ResultSucceeded  Result = "succeeded"
	ResultFailed     Result = "failed"
	ResultRolledBack Result = "rolled_back"
	// ResultUnchanged: the device already ran the desired system.
	ResultUnchanged Result = "unchanged"
)

// Final reports whether r ends an apply.
func (r Result) Final() bool {
	switch r {
	case ResultSucceeded, ResultFailed, ResultRolledBack, ResultUnchanged:
		return true
	}
	return false
}

// Event is published by an agent on fleet.dev.<id>.events at every state
// transition; the last one of an apply carries its Result.
type Event struct {
	Device    string    `json:"device"`
	Time      time.Time `json:"time"`
	State     State     `json:"state"`
	Result    Result    `json:"result,omitempty"`
	RolloutID string    `json:"rollout_id,omitempty"`
	ReleaseID string    `json:"release_id,omitempty"`
	StorePath string    `json:"store_path,omitempty"`
	// Error says what went wrong; Check names the failing health check.
	Error string `json:"error,omitempty"`
	Check string `json:"check,omitempty"`
	// Log is the tail of the failing command's output.
	Log        string `json:"log,omitempty"`
	DurationMS int64  `json:"duration_ms,omitempty"`
	// Attempt identifies one apply, so a reader can tell a resumed apply
	// (after a restart) from a new one.
	Attempt string `json:"attempt,omitempty"`
	// Command is the ID of the remote command a StateCommand event is about.
	Command string `json:"command,omitempty"`
	// Cache says, in an apply's result, where what it fetched from the
	// fleet cache came from: the site's copy or the hub's.
	Cache *CacheFetch `json:"cache,omitempty"`
}

// CacheFetch counts what one apply read from the fleet cache, by source.
type CacheFetch struct {
	SiteNarInfos int   `json:"site_narinfos,omitempty"`
	HubNarInfos  int   `json:"hub_narinfos,omitempty"`
	SiteBytes    int64 `json:"site_bytes,omitempty"`
	HubBytes     int64 `json:"hub_bytes,omitempty"`
}

// maxCacheFetch bounds what one apply may say it read (its counts feed
// the coordinator's metrics): a million paths, a tebibyte.
const (
	maxCacheFetchPaths = 1 << 20
	maxCacheFetchBytes = 1 << 40
)

// Check refuses counts no apply could have.
func (c *CacheFetch) Check() error {
	if c.SiteNarInfos < 0 || c.HubNarInfos < 0 || c.SiteBytes < 0 || c.HubBytes < 0 ||
		c.SiteNarInfos > maxCacheFetchPaths || c.HubNarInfos > maxCacheFetchPaths || c.SiteBytes > maxCacheFetchBytes || c.HubBytes > maxCacheFetchBytes {
		return fmt.Errorf("cache counts out of range: %+v", *c)
	}
	return nil
}

// Add adds o's counts to c.
func (c *CacheFetch) Add(o CacheFetch) {
	c.SiteNarInfos += o.SiteNarInfos
	c.HubNarInfos += o.HubNarInfos
	c.SiteBytes += o.SiteBytes
	c.HubBytes += o.HubBytes
}

// LastApply summarises an agent's most recent apply, for facts.
type LastApply struct {
	RolloutID string    `json:"rollout_id,omitempty"`
	ReleaseID string    `json:"release_id,omitempty"`
	StorePath string    `json:"store_path,omitempty"`
	Result    Result    `json:"result"`
	Error     string    `json:"error,omitempty"`
	Time      time.Time `json:"time"`
}
