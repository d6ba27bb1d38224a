package model

import (
	"encoding/json"
	"time"
)

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
	// Sample draws a random cohort of the target ("5%" or "20"), seeded
	// with Seed (0: the coordinator picks one and records it).
	Sample string `json:"sample,omitempty"`
	Seed   uint64 `json:"seed,omitempty"`
}

// DeployPreview is what a deploy would do (the deploy-preview verb,
// fleet-admin deploy --dry-run): nothing is written.
type DeployPreview struct {
	ReleaseID string `json:"release_id"`
	Group     string `json:"group,omitempty"`
	Sample    string `json:"sample,omitempty"`
	Seed      uint64 `json:"seed,omitempty"`
	// Devices are the devices the rollout would change, in batch order;
	// Unchanged already run the release and want it (skipped), Skipped
	// are left out for another reason (no closure for the host, pinned).
	Devices   []PreviewDevice `json:"devices"`
	Unchanged []PreviewDevice `json:"unchanged,omitempty"`
	Skipped   []PreviewDevice `json:"skipped,omitempty"`
	// BatchSizes are the new devices of each batch; Batches the spec they
	// come from.
	Batches    []Quantity `json:"batches"`
	BatchSizes []int      `json:"batch_sizes"`
	// Busy names devices held by unfinished rollouts (the deploy is
	// refused unless --supersede).
	Busy []string `json:"busy,omitempty"`
}

// PreviewDevice is one device of a deploy preview.
type PreviewDevice struct {
	ID      string `json:"id"`
	Name    string `json:"name"`
	Batch   int    `json:"batch"`
	Current string `json:"current_system,omitempty"`
	New     string `json:"new_system,omitempty"`
	Online  bool   `json:"online"`
	// LastSeen is when the coordinator last heard from it (zero: never).
	LastSeen time.Time `json:"last_seen,omitzero"`
	Reason   string    `json:"reason,omitempty"`
}

// DeployResult is the deploy verb's reply: the rollout created, or, when
// every target already runs the release, none (Unchanged counts them).
type DeployResult struct {
	*Rollout
	Unchanged int `json:"unchanged,omitempty"`
}

// RolloutRef names a rollout; Action is pause, resume or abort for the
// rollout-action verb. For the rollout verb, Page selects a page of the
// progress rows and SummaryOnly asks for the rollout alone (no rows), a
// small reply for polling.
type RolloutRef struct {
	ID     string `json:"id"`
	Action string `json:"action,omitempty"`
	// Revert, with abort, sets every device the rollout touched back to
	// its previous desired state (the undo action does so for a finished
	// rollout). ReleaseID is the rollout's release: the signed request
	// names what it undoes, so each device can check it.
	Revert      bool   `json:"revert,omitempty"`
	ReleaseID   string `json:"release_id,omitempty"`
	Page        Page   `json:"page,omitzero"`
	SummaryOnly bool   `json:"summary_only,omitempty"`
}

// RolloutView is a rollout with one page of its devices' progress, in
// batch order then by name; Next is the cursor of the following page (""
// when done). Rollout.Total counts every row.
type RolloutView struct {
	Rollout
	Progress []RolloutProgress `json:"progress"`
	Next     string            `json:"next,omitempty"`
}

// RolloutProgress is a device's progress as the rollout verb shows it: a
// RolloutDevice without the previous desired state (whose signed manifest
// would make every row kilobytes), naming it instead.
type RolloutProgress struct {
	Device    string             `json:"device"`
	Name      string             `json:"name"`
	Batch     int                `json:"batch"`
	State     DeviceRolloutState `json:"state"`
	StorePath string             `json:"store_path,omitempty"`
	Error     string             `json:"error,omitempty"`
	// PreviousRelease and PreviousStorePath name the desired state the
	// device had before the rollout ("": none).
	PreviousRelease   string    `json:"previous_release,omitempty"`
	PreviousStorePath string    `json:"previous_store_path,omitempty"`
	Started           time.Time `json:"started,omitzero"`
	Finished          time.Time `json:"finished,omitzero"`
}

// Progress is d as the rollout verb shows it.
func (d *RolloutDevice) Progress() RolloutProgress {
	p := RolloutProgress{
		Device: d.Device, Name: d.Name, Batch: d.Batch, State: d.State, StorePath: d.StorePath,
		Error: d.Error, Started: d.Started, Finished: d.Finished,
	}
	var prev DesiredRef
	if len(d.Previous) > 0 && json.Unmarshal(d.Previous, &prev) == nil {
		p.PreviousRelease, p.PreviousStorePath = prev.ReleaseID, prev.StorePath
	}
	return p
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

// AuditQuery selects audit entries newer than Since (0: all), one page at
// a time, oldest first (the reply is a PageOf[AuditRecord]; Since applies
// to the first page, later ones follow the cursor).
type AuditQuery struct {
	Since time.Duration `json:"since,omitempty"`
	Page  Page          `json:"page,omitzero"`
}

// LeafConfigRequest asks for a site's leaf node credentials: the leaf's
// public key (its seed stays with the admin) and the site name.
type LeafConfigRequest struct {
	Site string `json:"site"`
	Key  string `json:"key"`
	// SystemKey is the public key of the leaf's system-account link, over
	// which it learns account updates (revocations) and reports presence.
	SystemKey string `json:"system_key,omitempty"`
	// Cache asks for a copy of the binary cache at the site.
	Cache *SiteCache `json:"cache,omitempty"`
}

// LeafRevoke cuts a site's leaf links off: every cache link the site was
// issued (leaf config --cache), and the leaf links (leaf.creds) whose
// public keys Keys names (leaf config prints them).
type LeafRevoke struct {
	Site string   `json:"site"`
	Keys []string `json:"keys,omitempty"`
}

// LeafRevoked says what a LeafRevoke cut off.
type LeafRevoked struct {
	Site string `json:"site"`
	// CacheLinks: the site had a copy of the cache; its links are
	// revoked and its copy is no longer fed.
	CacheLinks bool      `json:"cache_links"`
	Keys       []string  `json:"keys,omitempty"`
	At         time.Time `json:"at"`
}

// SiteCache is a site's copy of the binary cache: the public key of the
// leaf's cache link that feeds it (a SITELINK user at the hub), and its
// bounds (the oldest go first).
type SiteCache struct {
	Key      string   `json:"key"`
	MaxBytes int64    `json:"max_bytes"`
	MaxAge   Duration `json:"max_age"`
}

// LeafConfig is what a site's standard nats-server needs to run as a leaf
// node of the hub.
type LeafConfig struct {
	Site string `json:"site"`
	JWT  string `json:"jwt"` // the leaf user's JWT (role leaf)
	// SystemUserJWT is the JWT of the leaf's system-account link.
	SystemUserJWT string `json:"system_user_jwt,omitempty"`
	OperatorJWT   string `json:"operator_jwt"`
	SystemAccount string `json:"system_account"`
	SystemJWT     string `json:"system_jwt"`
	FleetAccount  string `json:"fleet_account"`
	FleetJWT      string `json:"fleet_jwt"`
	// HubURL is the coordinator's leaf node URL as it knows it ("" when
	// it does not listen for leaf nodes).
	HubURL string `json:"hub_url,omitempty"`
	Domain string `json:"domain"`
	// The CORE account (FLEET imports the cache's direct gets from it; a
	// site's copy of the cache lives in it, in the site's own JetStream
	// domain) and, with a copy, the JWT of the link that feeds it.
	CoreAccount  string `json:"core_account,omitempty"`
	CoreJWT      string `json:"core_jwt,omitempty"`
	CacheUserJWT string `json:"cache_user_jwt,omitempty"`
}

// StatusQuery is the argument of the status verb.
type StatusQuery struct {
	Group string `json:"group,omitempty"`
	Page  Page   `json:"page,omitzero"`
}

// FactsQuery is the argument of the facts verb: a device's reports of the
// last Since, one page at a time, oldest first (the reply is a
// PageOf[Facts]).
type FactsQuery struct {
	Ref   string        `json:"ref"`
	Since time.Duration `json:"since"`
	Page  Page          `json:"page,omitzero"`
}
