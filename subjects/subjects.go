// Package subjects is the one place where fleet spells its NATS subjects,
// JetStream streams, KV buckets and the permission templates of its roles.
//
// Every other package builds names through these constants and functions, so
// a subject that the coordinator writes and an agent reads cannot drift apart,
// and the permissions a role gets are reviewed in one file.
package subjects

import (
	"fmt"
	"strings"

	"github.com/nats-io/nkeys"
)

// Domain is the default JetStream domain of the coordinator. Clients that may
// sit behind a leaf node address JetStream through it ($JS.<domain>.API...),
// which is why the agent templates below name it.
const Domain = "fleet"

// Account names.
const (
	AccountFleet  = "FLEET"
	AccountSystem = "SYS"
)

// KV buckets.
const (
	BucketDevices  = "fleet_devices"
	BucketDesired  = "fleet_desired"
	BucketReleases = "fleet_releases"
	BucketRollouts = "fleet_rollouts"
	BucketTokens   = "fleet_tokens"
	BucketAdmins   = "fleet_admins"
	BucketEscrow   = "fleet_escrow"
	BucketPayloads = "fleet_payloads"
	// BucketLocks holds leader locks (the rollout engine's) with a TTL.
	BucketLocks = "fleet_locks"
	// BucketNonces remembers the nonces of admin requests while they are
	// fresh, so a request is taken once, across restarts and coordinators.
	BucketNonces = "fleet_nonces"
)

// Buckets lists every KV bucket the coordinator owns.
var Buckets = []string{
	BucketDevices, BucketDesired, BucketReleases, BucketRollouts,
	BucketTokens, BucketAdmins, BucketEscrow, BucketPayloads, BucketLocks, BucketNonces,
}

// Streams.
const (
	StreamFacts  = "FLEET_FACTS"
	StreamEvents = "FLEET_EVENTS"
	StreamAudit  = "FLEET_AUDIT"
)

// Subjects that are not per device.
const (
	Enroll = "fleet.enroll"
	// CoordinatorQueue is the queue group of the coordinators' request
	// handlers (enrollment): in a cluster one coordinator answers each
	// request.
	CoordinatorQueue = "fleet-coordinator"
	// APIRead and APIWrite prefix the admin API verbs.
	APIRead  = "fleet.api.read"
	APIWrite = "fleet.api.write"
	// Audit prefixes the audit stream's subjects: fleet.audit.<verb>.
	Audit = "fleet.audit"

	devicePrefix = "fleet.dev"
)

// Stream subject filters.
const (
	AllFacts   = devicePrefix + ".*.facts"
	AllEvents  = devicePrefix + ".*.events"
	AllDesired = devicePrefix + ".*.desired"
	AllAudit   = Audit + ".>"
	AllDevices = devicePrefix + ".>"
)

// Per-device leaf tokens.
const (
	tokDesired = "desired"
	tokFacts   = "facts"
	tokEvents  = "events"
	tokCmd     = "cmd"
)

// DesiredRepublishSource and DesiredRepublishDest wire the fleet_desired KV to
// per-device notification subjects without a consumer per device.
const (
	DesiredRepublishSource = "$KV." + BucketDesired + ".*"
	DesiredRepublishDest   = devicePrefix + ".{{wildcard(1)}}." + tokDesired
)

// ValidDeviceID reports whether id can be a device ID: a device is named by
// its nkey user public key, which is also a safe single subject token.
//
// Only the canonical 56-character encoding counts: nkeys also accepts a key
// with a trailing character (its base32 decoder drops the spare bits), which
// would give one key a second name, and a revocation of one name would not
// cover the other.
func ValidDeviceID(id string) bool {
	return len(id) == publicKeyLen && nkeys.IsValidPublicUserKey(id)
}

// publicKeyLen is the length of an encoded nkey public key: prefix byte,
// 32-byte key and 2-byte CRC, 35 bytes in base32 without spare bits.
const publicKeyLen = 56

// CheckDeviceID returns a descriptive error when id is not a device ID.
func CheckDeviceID(id string) error {
	if !ValidDeviceID(id) {
		return fmt.Errorf("%q is not a device ID (a device ID is an nkey user public key starting with U)", id)
	}
	return nil
}

func device(id, leaf string) string {
	// Callers validate IDs at the edge; a token with wildcards or dots would
	// widen a subscription, so refuse to build one here as a second guard.
	if strings.ContainsAny(id, ".*> \t\r\n") || id == "" {
		return devicePrefix + ".invalid." + leaf
	}
	return devicePrefix + "." + id + "." + leaf
}

// DeviceDesired is where the coordinator's KV republishes device id's desired
// state.
func DeviceDesired(id string) string { return device(id, tokDesired) }

// DeviceFacts is where device id publishes its facts.
func DeviceFacts(id string) string { return device(id, tokFacts) }

// DeviceEvents is where device id publishes its events.
func DeviceEvents(id string) string { return device(id, tokEvents) }

// DeviceCmd is where device id listens for signed commands.
func DeviceCmd(id string) string { return device(id, tokCmd) }

// DeviceAll matches every subject of device id.
func DeviceAll(id string) string { return device(id, ">") }

// DeviceFromSubject returns the device ID of a fleet.dev.<id>.<leaf> subject.
// The leaf must be one plain token: a wildcard or an empty token is not a
// subject a device sent.
func DeviceFromSubject(subject string) (string, bool) {
	parts := strings.Split(subject, ".")
	if len(parts) != 4 || parts[0] != "fleet" || parts[1] != "dev" || !ValidDeviceID(parts[2]) {
		return "", false
	}
	if parts[3] == "" || strings.ContainsAny(parts[3], "*> \t\r\n") {
		return "", false
	}
	return parts[2], true
}

// APIReadVerb and APIWriteVerb are the subjects of admin API verbs.
func APIReadVerb(verb string) string  { return APIRead + "." + verb }
func APIWriteVerb(verb string) string { return APIWrite + "." + verb }

// AuditSubject is the audit stream subject for verb.
func AuditSubject(verb string) string { return Audit + "." + verb }

// InboxPrefix is the reply-inbox prefix an admin (or observer) with public
// key pub must use (nats.CustomInboxPrefix). Templates allow each user only
// its own prefix, so nobody can read replies meant for another, which may
// carry credentials.
func InboxPrefix(pub string) string { return "_INBOX_" + pub }

// DeviceInboxPrefix is the reply-inbox prefix of a device (and of an
// enrolling one, by its bearer key). Device inboxes share a first token so a
// site's leaf link can carry device replies, and only those: an admin's
// replies never cross a leaf.
func DeviceInboxPrefix(pub string) string { return deviceInboxes + "." + pub }

const deviceInboxes = "_INBOX_DEV"

// InboxPrefixFor is the reply-inbox prefix of a user of role r.
func InboxPrefixFor(r Role, pub string) string {
	if r == RoleAgent || r == RoleEnroll {
		return DeviceInboxPrefix(pub)
	}
	return InboxPrefix(pub)
}

// JSAPIPrefix is the JetStream API prefix in domain d; with d empty, the
// local prefix $JS.API of the server a client is connected to.
func JSAPIPrefix(d string) string {
	if d == "" {
		return "$JS.API"
	}
	return "$JS." + d + ".API"
}

// DirectGetLast is the direct-get subject that returns the last message of
// subject subj in stream, through domain d ("" for the local form).
func DirectGetLast(d, stream, subj string) string {
	return JSAPIPrefix(d) + ".DIRECT.GET." + stream + "." + subj
}

// KVStream is the stream behind KV bucket b.
func KVStream(b string) string { return "KV_" + b }

// KVKey is the stream subject of key in bucket b.
func KVKey(b, key string) string { return "$KV." + b + "." + key }

// DesiredDirectGet is the subject device id requests to read its own
// desired state.
func DesiredDirectGet(d, id string) string {
	return DirectGetLast(d, KVStream(BucketDesired), KVKey(BucketDesired, id))
}
