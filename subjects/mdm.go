package subjects

// Admin API verbs of the MDM duties: remote commands, sealed payloads,
// recovery-key escrow.
const (
	// VerbCommand sends admin-signed commands to devices (write).
	VerbCommand = "command"

	VerbPayloadPush   = "payload-push" // write: sealed payloads for devices
	VerbPayloadRemove = "payload-rm"   // write: withdraw a payload
	VerbPayloads      = "payloads"     // read: payloads and their delivery
)

// Device requests of the MDM duties, answered by the coordinator only into
// the asking device's own inbox; each device's template allows only its
// own.
const (
	// PayloadSync prefixes a device's signed request for its sealed
	// payloads: fleet.payloads.<dev>.
	PayloadSync    = "fleet.payloads"
	AllPayloadSync = PayloadSync + ".*"
	// EscrowPut prefixes a device's signed, sealed recovery keys:
	// fleet.escrow.<dev>.
	EscrowPut    = "fleet.escrow"
	AllEscrowPut = EscrowPut + ".*"
)

const (
	tokPayloads = "payloads"
	tokEscrow   = "escrow"
)

// PayloadSyncFor is where device id asks for its payloads.
func PayloadSyncFor(id string) string { return deviceRequest(PayloadSync, id) }

// EscrowPutFor is where device id sends its sealed recovery keys.
func EscrowPutFor(id string) string { return deviceRequest(EscrowPut, id) }

func deviceRequest(prefix, id string) string {
	// Templates pass {{subject()}} here.
	if id != self && !ValidDeviceID(id) {
		return prefix + ".invalid"
	}
	return prefix + "." + id
}

// DeviceFromRequest returns the device of a <prefix>.<dev> request subject.
func DeviceFromRequest(prefix, subj string) (string, bool) {
	if len(subj) <= len(prefix)+1 || subj[:len(prefix)+1] != prefix+"." {
		return "", false
	}
	id := subj[len(prefix)+1:]
	return id, ValidDeviceID(id)
}

// DevicePayloadsNotify is the trigger device id at site gets when its
// payloads changed, in its own inbox; DeviceEscrowNotify when the escrow
// key changed.
func DevicePayloadsNotify(site, id string) string {
	return DeviceInboxPrefix(site, id) + "." + tokPayloads
}
func DeviceEscrowNotify(site, id string) string { return DeviceInboxPrefix(site, id) + "." + tokEscrow }

// Escrow verbs.
const (
	VerbEscrowKey = "escrow-key" // write (owner): set the escrow public key
	VerbEscrowGet = "escrow-get" // write (owner, audited): sealed recovery keys of a device
	VerbEscrow    = "escrow"     // read: escrow state per device and disk
)

// EscrowKeyEntry is the fleet_escrow key of the current escrow key
// statement (device entries are "<device>.<disk>").
const EscrowKeyEntry = "escrow-key"

// VerbEncryption reads each device's disk-encryption state.
const VerbEncryption = "encryption"
