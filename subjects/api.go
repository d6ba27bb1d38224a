package subjects

// Admin API verbs. Each is one subject token so a template can allow a
// single verb (the observer role reads only "devices").
const (
	// Read verbs: fleet.api.read.<verb>.
	VerbDevices  = "devices" // list devices
	VerbDevice   = "device"  // show one device
	VerbTokens   = "tokens"  // list tokens (never their secrets)
	VerbReleases = "releases"
	VerbRelease  = "release"
	VerbRollouts = "rollouts"
	VerbRollout  = "rollout"
	VerbAdmins   = "admins"
	VerbAudit    = "audit"
	VerbStatus   = "status"
	VerbFacts    = "facts"

	// Write verbs: fleet.api.write.<verb>.
	VerbTokenCreate   = "token-create"
	VerbTokenRevoke   = "token-revoke"
	VerbDeviceApprove = "device-approve"
	VerbDeviceRevoke  = "device-revoke"
	VerbDeviceGroups  = "device-groups"
	VerbReleaseCreate = "release-create"
	VerbDeploy        = "deploy"
	VerbRolloutAction = "rollout-action" // pause, resume, abort
	VerbAdminAdd      = "admin-add"
	VerbAdminRemove   = "admin-remove"
	VerbLeafConfig    = "leaf-config"
)

// APIService is the name of the coordinator's admin API micro service.
const APIService = "fleet-api"

// Connection advisories of the system account for account acc.
func AccountConnect(acc string) string    { return "$SYS.ACCOUNT." + acc + ".CONNECT" }
func AccountDisconnect(acc string) string { return "$SYS.ACCOUNT." + acc + ".DISCONNECT" }

// ClaimsUpdate is where account JWT updates are pushed.
const ClaimsUpdate = "$SYS.REQ.CLAIMS.UPDATE"
