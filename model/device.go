package model

import (
	"fmt"
	"time"
)

// DeviceStatus is where a device stands in its life.
type DeviceStatus string

const (
	// DevicePending: enrolled with a token that needs approval; it may
	// connect but gets no desired state until approved.
	DevicePending DeviceStatus = "pending"
	DeviceActive  DeviceStatus = "active"
	// DeviceRevoked: its key is on the account's revocation list.
	DeviceRevoked DeviceStatus = "revoked"
)

// Device is a device record in the fleet_devices bucket, keyed by ID.
type Device struct {
	// ID is the device's nkey user public key.
	ID string `json:"id"`
	// Name is how the fleet shows the device: its host name, made
	// distinct ("laptop-2") when another device already has that name.
	// Hostname is the name the device reported, set when it differs from
	// Name; releases map host names to closures (Host).
	Name     string       `json:"name"`
	Hostname string       `json:"hostname,omitempty"`
	Groups   []string     `json:"groups,omitempty"`
	Site     string       `json:"site,omitempty"`
	Status   DeviceStatus `json:"status"`
	// XKey is the device's curve public key, for sealed payloads.
	XKey       string    `json:"xkey,omitempty"`
	EnrolledAt time.Time `json:"enrolled_at"`
	// TokenID names the enrollment token used (not the secret).
	TokenID   string    `json:"token_id,omitempty"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
	// Statement is the newest admin-signed request that set the device's
	// groups or pin (device-groups, device-pin): a device that joins a
	// group converges to the group's target, which an older deploy signed,
	// and this newer statement is what lets the agent take it (Desired.Join).
	Statement *Signed `json:"statement,omitempty"`
	// Pin holds the device on one release whatever its groups' targets.
	Pin *Pin `json:"pin,omitempty"`
}

// Host is the device's host name: what a release's closures are keyed by.
func (d *Device) Host() string {
	if d.Hostname != "" {
		return d.Hostname
	}
	return d.Name
}

// Pin is a device held on a release by an admin (fleet-admin devices pin).
type Pin struct {
	ReleaseID string    `json:"release_id"`
	At        time.Time `json:"at"`
	By        string    `json:"by,omitempty"`
	// Statement is the signed pin request: the agent takes it as the
	// deploy of that release to this one device.
	Statement *Signed `json:"statement,omitempty"`
}

// Desired is a device's desired state in the fleet_desired bucket (key: the
// device ID). The agent trusts only what the signed release says: it
// derives its store path, action and substituter from the manifest and
// refuses a Desired whose StorePath disagrees.
type Desired struct {
	Device    string `json:"device"`
	ReleaseID string `json:"release_id"`
	RolloutID string `json:"rollout_id,omitempty"`
	StorePath string `json:"store_path"`
	Action    Action `json:"action,omitempty"`
	// Release is the signed manifest of ReleaseID.
	Release  Signed    `json:"release"`
	IssuedAt time.Time `json:"issued_at"`
	// Deploy is the admin's signed deploy request that asked for it, and
	// Revert, on a desired state that goes back, the signed deploy being
	// undone: the agent takes nothing older than it already accepted
	// unless an admin signed the way back (CheckStatement).
	Deploy *Signed `json:"deploy,omitempty"`
	Revert *Signed `json:"revert,omitempty"`
	// Join, on a desired state that brings a device to its group's target
	// (or back to it from a pin), is the admin's newer signed statement
	// that put the device there: a device-groups or device-pin request
	// naming it.
	Join *Signed `json:"join,omitempty"`
}

// Resolve verifies d's manifest against trusted signers and returns the
// release and the store path that host must run.
func (d *Desired) Resolve(host string, trusted []string) (*Release, string, error) {
	r, err := VerifyRelease(&d.Release, trusted)
	if err != nil {
		return nil, "", err
	}
	if r.ID != d.ReleaseID {
		return nil, "", fmt.Errorf("desired state names release %q but carries manifest %q", d.ReleaseID, r.ID)
	}
	p, ok := r.PathFor(host)
	if !ok {
		return nil, "", fmt.Errorf("release %s has no closure for host %s", r.ID, host)
	}
	if d.StorePath != "" && d.StorePath != p {
		return nil, "", fmt.Errorf("desired store path %s is not the one release %s names for %s (%s)", d.StorePath, r.ID, host, p)
	}
	return r, p, nil
}
