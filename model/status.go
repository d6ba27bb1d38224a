package model

import "time"

// DeviceStatusRow is one device as `fleet-admin status` and the coordinator's
// /api/v1/devices show it: its record, what it last reported and what it
// should run. Fields the coordinator has not heard of yet are left empty.
type DeviceStatusRow struct {
	ID     string       `json:"id"`
	Name   string       `json:"name"`
	Groups []string     `json:"groups,omitempty"`
	Status DeviceStatus `json:"status"`
	// Online comes from the server's connect/disconnect advisories when the
	// coordinator has them, else from LastSeen (see broker/index.go).
	Online bool `json:"online"`
	// LastSeen is when the coordinator stored the device's latest facts or
	// event message (zero: never).
	LastSeen      time.Time `json:"last_seen,omitzero"`
	CurrentSystem string    `json:"current_system,omitempty"`
	DesiredSystem string    `json:"desired_system,omitempty"`
	// UpToDate: the device reported facts and runs its desired system (or
	// has none).
	UpToDate bool `json:"up_to_date"`
	// LastResult is the result of the device's latest apply ("" if none).
	LastResult   Result `json:"last_result,omitempty"`
	LastError    string `json:"last_error,omitempty"`
	RebootNeeded bool   `json:"reboot_needed"`
	// DiskMaxUsedRatio is the fullest mount's used fraction (0..1).
	DiskMaxUsedRatio float64 `json:"disk_max_used_ratio"`
	// Rollout is the rollout that wrote the device's desired state.
	Rollout string `json:"rollout,omitempty"`
	// DesiredRelease is the release of the desired state.
	DesiredRelease string `json:"desired_release,omitempty"`
	// Pinned is the release an admin pinned the device on; Conflict says
	// which of its groups want different releases (nothing is applied).
	Pinned   string `json:"pinned,omitempty"`
	Conflict string `json:"conflict,omitempty"`
}

// Failing reports whether the device's latest apply failed or was rolled
// back.
func (r DeviceStatusRow) Failing() bool {
	return r.LastResult == ResultFailed || r.LastResult == ResultRolledBack
}

// Pending reports whether the device has a desired system it does not run
// yet and its latest apply did not fail: an update is on its way.
func (r DeviceStatusRow) Pending() bool {
	return r.DesiredSystem != "" && r.CurrentSystem != r.DesiredSystem && !r.Failing()
}

// StatusSummary counts a StatusReport's devices.
type StatusSummary struct {
	Total    int `json:"total"`
	Online   int `json:"online"`
	UpToDate int `json:"up_to_date"`
	// Failing: latest apply failed or was rolled back.
	Failing int `json:"failing"`
	// Pending: a desired system not yet running, no failure.
	Pending int `json:"pending"`
	// AwaitingApproval: records in status pending (enrolled, not approved).
	AwaitingApproval int `json:"awaiting_approval"`
}

// StatusReport is the fleet's state for `fleet-admin status`. Over the API
// it is paged: Devices holds one page (by ID), Next the cursor of the
// following one ("" when done); Summary always counts every device of the
// group.
type StatusReport struct {
	// Group filters the devices ("" = all).
	Group   string            `json:"group,omitempty"`
	Time    time.Time         `json:"time"`
	Summary StatusSummary     `json:"summary"`
	Devices []DeviceStatusRow `json:"devices"`
	Next    string            `json:"next,omitempty"`
}

// Summarize counts rows.
func Summarize(rows []DeviceStatusRow) StatusSummary {
	s := StatusSummary{Total: len(rows)}
	for _, r := range rows {
		if r.Online {
			s.Online++
		}
		if r.UpToDate {
			s.UpToDate++
		}
		if r.Failing() {
			s.Failing++
		}
		if r.Pending() {
			s.Pending++
		}
		if r.Status == DevicePending {
			s.AwaitingApproval++
		}
	}
	return s
}

// RolloutStatusRow is a rollout summary without its device list, for
// /api/v1/rollouts and dashboards.
type RolloutStatusRow struct {
	ID        string                     `json:"id"`
	ReleaseID string                     `json:"release_id"`
	Group     string                     `json:"group,omitempty"`
	State     RolloutState               `json:"state"`
	Strategy  Strategy                   `json:"strategy"`
	Batch     int                        `json:"batch"`
	Batches   int                        `json:"batches"`
	Devices   int                        `json:"devices"`
	Counts    map[DeviceRolloutState]int `json:"counts"`
	Reason    string                     `json:"reason,omitempty"`
	CreatedAt time.Time                  `json:"created_at"`
	UpdatedAt time.Time                  `json:"updated_at"`
}

// RolloutRow summarises r.
func RolloutRow(r *Rollout) RolloutStatusRow {
	return RolloutStatusRow{
		ID: r.ID, ReleaseID: r.ReleaseID, Group: r.Group, State: r.State, Strategy: r.Strategy,
		Batch: r.Batch, Batches: len(r.BatchSizes), Devices: r.Total, Counts: r.Counts,
		Reason: r.Reason, CreatedAt: r.CreatedAt, UpdatedAt: r.UpdatedAt,
	}
}
