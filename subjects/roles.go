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
)

// Roles lists every role, each of which gets a scoped signing key.
var Roles = []Role{RoleAgent, RoleViewer, RoleOperator, RoleOwner, RoleLeaf, RoleEnroll, RoleObserver}

// AdminRoles are the roles a person, CI job or dashboard can hold.
var AdminRoles = []Role{RoleObserver, RoleViewer, RoleOperator, RoleOwner}

// ParseRole returns the role named s.
func ParseRole(s string) (Role, error) {
	for _, r := range Roles {
		if string(r) == s {
			return r, nil
		}
	}
	return "", fmt.Errorf("unknown role %q (one of agent, viewer, operator, owner, leaf, enroll, observer)", s)
}

// Template is a role's permission template. {{subject()}} is replaced by the
// server with the connecting user's public key.
type Template struct {
	Pub []string
	Sub []string
	// Responses lets the user answer requests sent to it (one reply each).
	Responses bool
	// Bearer users connect with the JWT alone, without proving the key.
	Bearer bool
	// ConnTypes limits how the user may connect (empty: any).
	ConnTypes []string
}

const self = "{{subject()}}"

// selfInbox and selfDeviceInbox are the template forms of InboxPrefix and
// DeviceInboxPrefix: only one's own replies.
var (
	selfInbox       = InboxPrefix(self) + ".>"
	selfDeviceInbox = DeviceInboxPrefix(self) + ".>"
)

// RoleTemplate returns the permission template of role r in JetStream
// domain d.
//
// Every JetStream API subject is allowed in two forms. A client directly on
// the coordinator sends the domain form ($JS.<d>.API...), but the server maps
// it to the local form ($JS.API...) before it checks permissions, so the
// local form must be allowed. A client at a leaf node is checked by the leaf
// server on the domain form, which then crosses the leaf link. Both forms
// name the same operation on the same hub stream.
func RoleTemplate(r Role, d string) Template {
	api := func(rest ...string) []string {
		var out []string
		for _, prefix := range apiPrefixes(d) {
			for _, s := range rest {
				out = append(out, prefix+s)
			}
		}
		return out
	}
	readStreams := api(
		".STREAM.INFO."+StreamFacts,
		".STREAM.INFO."+StreamEvents,
		".DIRECT.GET."+StreamFacts+".>",
		".DIRECT.GET."+StreamEvents+".>",
		".DIRECT.GET."+StreamFacts,
		".DIRECT.GET."+StreamEvents,
	)
	switch r {
	case RoleAgent:
		pub := []string{DeviceAll(self)}
		for _, dom := range apiDomains(d) {
			pub = append(pub, DesiredDirectGet(dom, self))
		}
		return Template{
			Pub:       pub,
			Sub:       []string{DeviceAll(self), selfDeviceInbox},
			Responses: true,
		}
	case RoleEnroll:
		return Template{
			Pub:    []string{Enroll},
			Sub:    []string{selfDeviceInbox},
			Bearer: true,
		}
	case RoleViewer:
		// Write verbs too: the coordinator refuses them for a viewer (its
		// role in fleet_admins is the authority) and the audit records the
		// refusal, which a denial by the server would leave unrecorded.
		return Template{
			Pub: append([]string{APIRead + ".>", APIWrite + ".>"}, readStreams...),
			Sub: []string{selfInbox},
		}
	case RoleOperator:
		return Template{
			Pub: append([]string{APIRead + ".>", APIWrite + ".>"}, readStreams...),
			Sub: []string{selfInbox},
		}
	case RoleOwner:
		return Template{
			Pub: []string{">"},
			Sub: []string{selfInbox, "fleet.>"},
		}
	case RoleObserver:
		return Template{
			Pub: append([]string{APIRead + "." + VerbDevices, APIRead + "." + VerbStatus, APIRead + "." + VerbFacts}, api(".STREAM.INFO."+StreamFacts)...),
			Sub: []string{selfInbox},
		}
	case RoleLeaf:
		// For a leaf connection, "pub" is what the site may send into the hub
		// and "sub" what the hub forwards to the site. Devices at the site are
		// held to their own templates by the leaf server; the link itself
		// carries only device traffic: device subjects, enrollment requests,
		// direct gets of desired states, replies to the coordinator's
		// requests, and back device replies. Never the admin API, the audit,
		// other JetStream API calls or anyone's enrollment secrets.
		pub := []string{AllDevices, Enroll, "_INBOX.>"}
		for _, dom := range apiDomains(d) {
			pub = append(pub, DirectGetLast(dom, KVStream(BucketDesired), KVKey(BucketDesired, "*")))
		}
		return Template{
			Pub:       pub,
			Sub:       []string{AllDevices, deviceInboxes + ".>"},
			ConnTypes: []string{"LEAFNODE"},
		}
	}
	return Template{}
}

// apiDomains are the domains a template names JetStream API subjects in:
// none (the local form) and d.
func apiDomains(d string) []string {
	if d == "" {
		return []string{""}
	}
	return []string{"", d}
}

func apiPrefixes(d string) []string {
	var out []string
	for _, dom := range apiDomains(d) {
		out = append(out, JSAPIPrefix(dom))
	}
	return out
}
