package model

import "time"

// Facts is a device's report on fleet.dev.<id>.facts. A source the agent
// could not read is left at its zero value and named in Unknown, so a reader
// can tell "0" from "not known".
type Facts struct {
	Device string    `json:"device"`
	Time   time.Time `json:"time"`

	Hostname      string `json:"hostname"`
	NixOSVersion  string `json:"nixos_version,omitempty"`
	CurrentSystem string `json:"current_system,omitempty"`
	BootedSystem  string `json:"booted_system,omitempty"`
	// RebootNeeded: the booted kernel, initrd or modules differ from the
	// current system's.
	RebootNeeded bool   `json:"reboot_needed"`
	Kernel       string `json:"kernel,omitempty"`

	UptimeSeconds float64    `json:"uptime_seconds,omitempty"`
	Load          [3]float64 `json:"load"`
	MemoryTotal   uint64     `json:"memory_total_bytes,omitempty"`
	MemoryAvail   uint64     `json:"memory_available_bytes,omitempty"`
	Mounts        []Mount    `json:"mounts,omitempty"`

	Encryption Encryption `json:"encryption"`

	AgentVersion string     `json:"agent_version,omitempty"`
	LastApply    *LastApply `json:"last_apply,omitempty"`

	// Unknown names the facts that could not be read (e.g. "lsblk").
	Unknown []string `json:"unknown,omitempty"`
}

// FactsInterval is how often an agent reports facts by default (DESIGN
// §4): every 5 minutes, and at once on a change that matters.
const FactsInterval = 5 * time.Minute

// Mount is one mounted file system.
type Mount struct {
	Path      string `json:"path"`
	Device    string `json:"device,omitempty"`
	FSType    string `json:"fstype,omitempty"`
	SizeBytes uint64 `json:"size_bytes"`
	UsedBytes uint64 `json:"used_bytes"`
}

// UsedRatio is the fraction of the mount in use (0 when its size is 0).
func (m Mount) UsedRatio() float64 {
	if m.SizeBytes == 0 {
		return 0
	}
	return float64(m.UsedBytes) / float64(m.SizeBytes)
}

// Encryption is the disk-encryption state.
type Encryption struct {
	// RootEncrypted is nil when it could not be determined.
	RootEncrypted *bool    `json:"root_encrypted,omitempty"`
	LUKSDevices   []string `json:"luks_devices,omitempty"`
}
