package model

import "time"

// GroupTarget is a group's target release, key <group> in fleet_groups:
// written when a rollout over the whole group succeeds. A device that
// joins the group later (enrolled, or moved into it) converges to it.
type GroupTarget struct {
	Group     string `json:"group"`
	ReleaseID string `json:"release_id"`
	// RolloutID is the rollout that set it; Deploy is that rollout's
	// signed deploy request, which every converging device's desired
	// state carries.
	RolloutID string    `json:"rollout_id"`
	Deploy    *Signed   `json:"deploy,omitempty"`
	SetAt     time.Time `json:"set_at"`
	// HealthTimeout is the deploy's, for the devices that converge.
	HealthTimeout Duration `json:"health_timeout,omitempty"`
}

// DevicePin is the argument of the device-pin verb: hold device Ref on
// ReleaseID; an empty ReleaseID unpins it (it follows its groups again).
type DevicePin struct {
	Ref       string `json:"ref"`
	ReleaseID string `json:"release_id,omitempty"`
}

// GroupRef names a group (the group verb).
type GroupRef struct {
	Group string `json:"group"`
}

// GroupRow is one line of fleet-admin groups ls: a group, its target and
// how its active devices stand against it.
type GroupRow struct {
	Group     string    `json:"group"`
	ReleaseID string    `json:"release_id,omitempty"`
	RolloutID string    `json:"rollout_id,omitempty"`
	SetAt     time.Time `json:"set_at,omitzero"`
	Devices   int       `json:"devices"`
	// OnTarget run the target; Behind do not (yet), Failing last failed
	// to apply it, Conflicts are in another group with another target
	// (nothing is applied to them), Pinned are held on a release.
	OnTarget  int `json:"on_target"`
	Behind    int `json:"behind"`
	Failing   int `json:"failing"`
	Conflicts int `json:"conflicts"`
	Pinned    int `json:"pinned"`
}

// GroupView is fleet-admin groups show: the row and every device.
type GroupView struct {
	GroupRow
	Members []GroupMember `json:"members"`
}

// GroupMember is a device of a group and where it stands.
type GroupMember struct {
	ID    string `json:"id"`
	Name  string `json:"name"`
	State string `json:"state"` // on-target, behind, failing, conflict, pinned, no-target
	// CurrentSystem is what the device runs, DesiredRelease what it was
	// last told to run.
	CurrentSystem  string `json:"current_system,omitempty"`
	DesiredRelease string `json:"desired_release,omitempty"`
	Detail         string `json:"detail,omitempty"`
}

// Group member states.
const (
	MemberOnTarget = "on-target"
	MemberBehind   = "behind"
	MemberFailing  = "failing"
	MemberConflict = "conflict"
	MemberPinned   = "pinned"
	MemberNoTarget = "no-target"
)
