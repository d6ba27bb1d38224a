package subjects

import "fmt"

// Role names a scoped signing key of the FLEET account. The role of a user is
// fixed by the key that signed its JWT; its permissions come from the
// template below, written once into the account JWT.
type Role string

const (
	RoleAgent    Role = "agent"
	RoleViewer   Role = "viewer"
	RoleOperator Role = "operator"
	RoleOwner    Role = "owner"
	RoleLeaf     Role = "leaf"
	RoleEnroll   Role = "enroll"
	RoleObserver Role = "observer"
	// RolePending is a device enrolled with a token that needs approval:
	// it can only ask whether it was approved.
	RolePending Role = "pending"
)

// Roles lists every role, each of which gets a scoped signing key.
var Roles = []Role{RoleAgent, RoleViewer, RoleOperator, RoleOwner, RoleLeaf, RoleEnroll, RoleObserver, RolePending}

// AdminRoles are the roles a person, CI job or dashboard can hold.
var AdminRoles = []Role{RoleObserver, RoleViewer, RoleOperator, RoleOwner}

// ParseRole returns the role named s.
func ParseRole(s string) (Role, error) {
	for _, r := range Roles {
		if string(r) == s {
			return r, nil
		}
	}
	return "", fmt.Errorf("unknown role %q (one of agent, viewer, operator, owner, leaf, enroll, observer, pending)", s)
}

// Template is a role's permission template. {{subject()}} is replaced by the
// server with the connecting user's public key, {{tag(site)}} with the site
// in the user's tags.
type Template struct {
	Pub []string
	Sub []string
	// Bearer users connect with the JWT alone, without proving the key.
	Bearer bool
	// ConnTypes limits how the user may connect (empty: any).
	ConnTypes []string
	// MaxSubs and MaxPayload bound each connection of the role (0: the
	// account's limits).
	MaxSubs    int64
	MaxPayload int64
}

const (
	self     = "{{subject()}}"
	selfSite = "{{tag(" + siteTagName + ")}}"
)

// selfInbox and selfDeviceInbox are the template forms of InboxPrefix and
// DeviceInboxPrefix: only one's own replies.
var (
	selfInbox       = InboxPrefix(self) + ".>"
	selfDeviceInbox = DeviceInboxPrefix(selfSite, self) + ".>"
)

// Limits of device-side roles: a device needs a handful of subscriptions
// (its inbox, the request mux) and sends facts, events and small requests.
const (
	deviceMaxSubs    = 16
	deviceMaxPayload = 256 << 10
	enrollMaxPayload = 64 << 10
	adminMaxSubs     = 256
)

// RoleTemplate returns the permission template of role r.
//
// No role may both send and receive a subject it could echo through: a
// client receives only its own inbox (replies, and the coordinator's
// triggers and commands), and sends only requests the coordinator
// validates. No role answers requests (allow_responses): the coordinator
// is the only responder. Every subject here is in the FLEET account; the
// state lives in CORE, which no client can name.
func RoleTemplate(r Role) Template {
	switch r {
	case RoleAgent:
		return Template{
			// SiteNar and SiteNarInfo reach only a site's mirrors of the
			// cache (read-only direct gets; nothing answers at the hub).
			Pub:        []string{DeviceFacts(self), DeviceEvents(self), DesiredGet + "." + self, PayloadSyncFor(self), EscrowPutFor(self), CacheGetFor(self), SiteNar, SiteNarInfo + ".*"},
			Sub:        []string{selfDeviceInbox},
			MaxSubs:    deviceMaxSubs,
			MaxPayload: deviceMaxPayload,
		}
	case RolePending:
		// A device waiting for approval may only ask again whether it
		// was approved.
		return Template{
			Pub:        []string{Enroll},
			Sub:        []string{selfDeviceInbox},
			MaxSubs:    deviceMaxSubs,
			MaxPayload: enrollMaxPayload,
		}
	case RoleEnroll:
		return Template{
			Pub:        []string{Enroll},
			Sub:        []string{selfDeviceInbox},
			Bearer:     true,
			MaxSubs:    deviceMaxSubs,
			MaxPayload: enrollMaxPayload,
		}
	case RoleViewer, RoleOperator, RoleOwner:
		// Write verbs too, for every admin role: the coordinator refuses
		// them by role (fleet_admins is the authority) and the audit
		// records the refusal, which a denial by the server would leave
		// unrecorded.
		return Template{
			Pub:     []string{APIRead + ".>", APIWrite + ".>"},
			Sub:     []string{selfInbox},
			MaxSubs: adminMaxSubs,
		}
	case RoleObserver:
		return Template{
			Pub:     []string{APIReadVerb(VerbDevices), APIReadVerb(VerbStatus), APIReadVerb(VerbFacts)},
			Sub:     []string{selfInbox},
			MaxSubs: adminMaxSubs,
		}
	case RoleLeaf:
		// For a leaf connection, "pub" is what the site may send into the
		// hub and "sub" what the hub forwards to the site. Devices at the
		// site are held to their own templates by the leaf server; the
		// link itself carries only device requests into the hub (each
		// verified by the coordinator: signed facts and events, desired
		// gets answered only into the asking device's inbox, enrollment)
		// and back only its own site's device inboxes. Never the admin
		// API, another site's replies, or anyone's desired state.
		return Template{
			Pub:       []string{AllFacts, AllEvents, AllDesiredGet, AllPayloadSync, AllEscrowPut, AllCacheGet, Enroll},
			Sub:       []string{SiteInboxes(selfSite)},
			ConnTypes: []string{"LEAFNODE"},
		}
	}
	return Template{}
}
