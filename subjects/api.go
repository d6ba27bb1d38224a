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
	VerbGroups   = "groups" // list groups, their targets and standing
	VerbGroup    = "group"  // one group and its members
	// VerbDeployPreview is deploy --dry-run: what a deploy would do, read
	// only (it writes nothing, not even the audit).
	VerbDeployPreview = "deploy-preview"

	// Write verbs: fleet.api.write.<verb>.
	VerbTokenCreate   = "token-create"
	VerbTokenRevoke   = "token-revoke"
	VerbDeviceApprove = "device-approve"
	VerbDeviceRevoke  = "device-revoke"
	VerbDeviceGroups  = "device-groups"
	VerbDevicePin     = "device-pin" // pin a device on a release, or unpin it
	VerbReleaseCreate = "release-create"
	VerbDeploy        = "deploy"
	VerbRolloutAction = "rollout-action" // pause, resume, abort
	VerbAdminAdd      = "admin-add"
	VerbAdminRemove   = "admin-remove"
	VerbLeafConfig    = "leaf-config"
	VerbLeafRevoke    = "leaf-revoke"
)

// APIService is the name of the coordinator's admin API micro service.
const APIService = "fleet-api"

// Connection advisories of the system account for account acc.
func AccountConnect(acc string) string    { return "$SYS.ACCOUNT." + acc + ".CONNECT" }
func AccountDisconnect(acc string) string { return "$SYS.ACCOUNT." + acc + ".DISCONNECT" }

// ClaimsUpdate is the servers' general account-update subject; fleet pushes
// updates per account (AccountClaimsUpdate), and no site may send either.
const ClaimsUpdate = "$SYS.REQ.CLAIMS.UPDATE"

// AccountClaimsUpdate is where the update of account acc's JWT is pushed so
// every server that holds it hears: the hub's full resolvers and the cache
// resolvers of leaf nodes at sites.
func AccountClaimsUpdate(acc string) string { return "$SYS.REQ.ACCOUNT." + acc + ".CLAIMS.UPDATE" }

// SiteSystemTemplate is what a site's leaf node may do in the system
// account: look account JWTs up, hear their updates (revocations) and
// nothing more. It cannot report connects or disconnects: a site's word on
// presence would let a rogue site show any device online, so the hub
// counts a device behind a leaf as seen only by its own signed reports.
// "Pub" is what the site sends to the hub, "Sub" what the hub sends to it.
func SiteSystemTemplate() Template {
	return Template{
		Pub: []string{
			// Its own lookups only. It may not answer the coordinator's
			// update requests: the hub's servers do, and a site that could
			// would answer first with an error of its choosing.
			"$SYS.REQ.ACCOUNT.*.CLAIMS.LOOKUP",
		},
		Sub: []string{
			"$SYS.REQ.ACCOUNT.*.CLAIMS.UPDATE", "$SYS.ACCOUNT.*.CLAIMS.UPDATE",
			"$SYS._INBOX.>", "$SYS._INBOX_.>", // answers to the leaf's lookups
		},
		ConnTypes: []string{"LEAFNODE"},
	}
}
