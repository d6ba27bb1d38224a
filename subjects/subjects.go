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
//
// CORE holds every stream and bucket; its only users are the coordinators'
// own connections, so no client can name a subject in it, and no reply a
// client chooses can land in it. FLEET holds every client (devices, admins,
// enrolling bearers, leaf links) and stores nothing: the coordinator
// answers FLEET's requests with its FLEET connection after validating them,
// and writes to CORE with its CORE connection. A site with a copy of the
// cache has a link account of its own (SITELINK_<site>), which reaches
// CORE only through its imports (SiteLinkImports).
const (
	AccountCore     = "CORE"
	AccountFleet    = "FLEET"
	AccountSystem   = "SYS"
	AccountSiteLink = "SITELINK" // the prefix of sites' link accounts
)

// DefaultSite is the site of devices that connect to the hub directly
// rather than through a site's leaf node. It is not a valid leaf site name.
const DefaultSite = "hub"

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
	// BucketRevocations holds one key per revoked user key, written with
	// Create and never deleted: every account JWT a coordinator pushes
	// carries the whole set, so revocations never undo each other.
	BucketRevocations = "fleet_revocations"
	// BucketClaims holds, per device, the rollout that may drive it: taken
	// with Create (or from a finished or superseded rollout with a
	// revision check), so two rollouts, or two engine leaders, never
	// both drive one device.
	BucketClaims = "fleet_claims"
	// BucketGroups holds each group's target release (key: the group).
	BucketGroups = "fleet_groups"
)

// Buckets lists every KV bucket the coordinator owns.
var Buckets = []string{
	BucketDevices, BucketDesired, BucketReleases, BucketRollouts,
	BucketTokens, BucketAdmins, BucketEscrow, BucketPayloads, BucketLocks, BucketNonces, BucketRevocations, BucketClaims, BucketGroups,
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
	// DesiredGet prefixes the requests a device sends for its own desired
	// state: fleet.desired.<dev>, answered by the coordinator.
	DesiredGet = "fleet.desired"
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

// Subject filters. Facts and events are what devices send in FLEET and
// what the CORE streams hold after the coordinator verified them.
const (
	AllFacts      = devicePrefix + ".*.facts"
	AllEvents     = devicePrefix + ".*.events"
	AllDesiredGet = DesiredGet + ".*"
	AllAudit      = Audit + ".>"
)

// DesiredRepublishSource and DesiredRepublishDest wire the fleet_desired KV
// to a CORE-internal change notification (headers only) without a consumer
// per device; a coordinator turns each into a trigger in the device's own
// inbox (DeviceNotify), except for writes that carry HeaderAnnounced: the
// rollout engine tells those devices itself, once a whole batch is written.
const (
	DesiredRepublishSource = "$KV." + BucketDesired + ".*"
	DesiredRepublishDest   = devicePrefix + ".{{wildcard(1)}}." + tokDesired
	AllDesired             = devicePrefix + ".*." + tokDesired
	HeaderAnnounced        = "Fleet-Announced"
)

// Per-device leaf tokens.
const (
	tokDesired = "desired"
	tokFacts   = "facts"
	tokEvents  = "events"
	tokCmd     = "cmd"
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

// DeviceDesired is the CORE-internal notification that device id's
// desired state changed (the KV's RePublish, headers only).
func DeviceDesired(id string) string { return device(id, tokDesired) }

// DeviceFacts is where device id sends its signed facts.
func DeviceFacts(id string) string { return device(id, tokFacts) }

// DeviceEvents is where device id sends its signed events.
func DeviceEvents(id string) string { return device(id, tokEvents) }

// DesiredGetFor is the request subject device id reads its desired state
// on. The coordinator answers it only into the device's own inbox.
func DesiredGetFor(id string) string {
	if !ValidDeviceID(id) {
		return DesiredGet + ".invalid"
	}
	return DesiredGet + "." + id
}

// DeviceNotify is the trigger the coordinator sends device id at site
// when its desired state changed. It lies in the device's own inbox, which
// only that device (and its site's leaf link) may receive, so no
// notification permission exists that could be aimed at another device.
func DeviceNotify(site, id string) string { return DeviceInboxPrefix(site, id) + "." + tokDesired }

// DeviceInboxLeaves matches what the coordinator sends into device id's
// own inbox at site (triggers, commands, kicks), one token under its
// prefix, and no reply: replies use two tokens or more under it.
func DeviceInboxLeaves(site, id string) string { return DeviceInboxPrefix(site, id) + ".*" }

// DeviceCmd is where device id at site receives signed commands, likewise
// in its own inbox.
func DeviceCmd(site, id string) string { return DeviceInboxPrefix(site, id) + "." + tokCmd }

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

// DeviceInboxPrefix is the reply-inbox prefix of a device at site (and of
// an enrolling one, by its bearer key). Device inboxes share a first token
// and name the site, so a site's leaf link carries its own devices' replies
// and triggers, and only those: an admin's replies, and another site's,
// never cross it.
func DeviceInboxPrefix(site, pub string) string {
	// Callers validate at the edge; a wildcard or dot would widen what the
	// prefix names, so refuse to build one here as a second guard.
	if strings.ContainsAny(site+pub, ".*> \t\r\n") || site == "" || pub == "" {
		return deviceInboxes + ".invalid"
	}
	return deviceInboxes + "." + site + "." + pub
}

const deviceInboxes = "_INBOX_DEV"

// SiteInboxes matches every device inbox of site.
func SiteInboxes(site string) string { return deviceInboxes + "." + site + ".>" }

// InboxPrefixFor is the reply-inbox prefix of a user of role r at site.
func InboxPrefixFor(r Role, site, pub string) string {
	switch r {
	case RoleAgent, RoleEnroll, RolePending:
		return DeviceInboxPrefix(site, pub)
	}
	return InboxPrefix(pub)
}

// ValidSite reports whether s can name a site: lower-case letters, digits
// and '-', one subject token.
func ValidSite(s string) bool {
	if s == "" || len(s) > 63 || s[0] == '-' {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-') {
			return false
		}
	}
	return true
}

// SiteTag is the user JWT tag that names a device's (or leaf's) site; the
// role templates expand it with {{tag(site)}}.
func SiteTag(site string) string { return siteTagName + ":" + site }

const siteTagName = "site"

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

// InInbox reports whether reply is a subject under the inbox prefix: the
// check every responder makes before it answers, so a reply can only ever
// reach the one who asked.
func InInbox(reply, prefix string) bool {
	return len(reply) > len(prefix)+1 && reply[len(prefix)] == '.' && reply[:len(prefix)] == prefix
}

// AdminInboxKey returns the user key of an admin inbox subject
// (_INBOX_<key>.…), or false.
func AdminInboxKey(reply string) (string, bool) {
	rest, ok := strings.CutPrefix(reply, "_INBOX_")
	if !ok {
		return "", false
	}
	key, tail, ok := strings.Cut(rest, ".")
	if !ok || tail == "" || !ValidDeviceID(key) {
		return "", false
	}
	return key, true
}

// DeviceInboxOf returns the site and key of a device inbox subject
// (_INBOX_DEV.<site>.<key>.…), or false.
func DeviceInboxOf(reply string) (site, key string, ok bool) {
	rest, ok := strings.CutPrefix(reply, deviceInboxes+".")
	if !ok {
		return "", "", false
	}
	parts := strings.SplitN(rest, ".", 3)
	if len(parts) != 3 || parts[2] == "" || !ValidSite(parts[0]) || !ValidDeviceID(parts[1]) {
		return "", "", false
	}
	return parts[0], parts[1], true
}
