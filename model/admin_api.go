package model

import "time"

// Arguments and replies of the release, rollout, admin and audit verbs.

// ReleaseView is a recorded release with its signed manifest.
type ReleaseView struct {
	Release
	Signed Signed `json:"signed"`
}

// ReleaseRef names a release.
type ReleaseRef struct {
	ID string `json:"id"`
}

// DeployRequest asks for a rollout of a release (the deploy verb).
type DeployRequest struct {
	ReleaseID     string   `json:"release_id"`
	Group         string   `json:"group,omitempty"`
	Devices       []string `json:"devices,omitempty"`
	Strategy      string   `json:"strategy,omitempty"`
	Batches       string   `json:"batches,omitempty"`
	MaxFailures   string   `json:"max_failures,omitempty"`
	HealthTimeout string   `json:"health_timeout,omitempty"`
	OnFailure     string   `json:"on_failure,omitempty"`
	// Supersede takes devices out of other unfinished rollouts.
	Supersede bool `json:"supersede,omitempty"`
}

// RolloutRef names a rollout; Action is pause, resume or abort for the
// rollout-action verb.
type RolloutRef struct {
	ID     string `json:"id"`
	Action string `json:"action,omitempty"`
}

// RolloutView is a rollout with each device's progress.
type RolloutView struct {
	Rollout
	Progress []RolloutDevice `json:"progress"`
}

// AdminAdd is the argument of admin-add: the new admin's public key (its
// seed never leaves the machine that made it).
type AdminAdd struct {
	Name   string   `json:"name"`
	Role   string   `json:"role"`
	Groups []string `json:"groups,omitempty"`
	Key    string   `json:"key"`
}

// AdminAdded is the reply of admin-add: the record and the user JWT the
// scoped role key issued.
type AdminAdded struct {
	Admin Admin  `json:"admin"`
	JWT   string `json:"jwt"`
}

// AdminRef names an admin by name or key.
type AdminRef struct {
	Ref string `json:"ref"`
}

// AuditQuery selects audit entries newer than Since (0: all).
type AuditQuery struct {
	Since time.Duration `json:"since,omitempty"`
	Limit int           `json:"limit,omitempty"`
}

// LeafConfigRequest asks for a site's leaf node credentials: the leaf's
// public key (its seed stays with the admin) and the site name.
type LeafConfigRequest struct {
	Site string `json:"site"`
	Key  string `json:"key"`
}

// LeafConfig is what a site's standard nats-server needs to run as a leaf
// node of the hub.
type LeafConfig struct {
	Site          string `json:"site"`
	JWT           string `json:"jwt"` // the leaf user's JWT (role leaf)
	OperatorJWT   string `json:"operator_jwt"`
	SystemAccount string `json:"system_account"`
	SystemJWT     string `json:"system_jwt"`
	FleetAccount  string `json:"fleet_account"`
	FleetJWT      string `json:"fleet_jwt"`
	// HubURL is the coordinator's leaf node URL as it knows it ("" when
	// it does not listen for leaf nodes).
	HubURL string `json:"hub_url,omitempty"`
	Domain string `json:"domain"`
}

// StatusQuery is the argument of the status verb.
type StatusQuery struct {
	Group string `json:"group,omitempty"`
}

// FactsQuery is the argument of the facts verb: a device's reports of the
// last Since.
type FactsQuery struct {
	Ref   string        `json:"ref"`
	Since time.Duration `json:"since"`
}
