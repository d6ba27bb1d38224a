package subjects

import (
	"slices"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
)

func newDevice(t testing.TB) string {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	return pub
}

func TestBuilders(t *testing.T) {
	id := newDevice(t)
	cases := []struct {
		name, got, want string
	}{
		{"DeviceDesired", DeviceDesired(id), "fleet.dev." + id + ".desired"},
		{"DeviceFacts", DeviceFacts(id), "fleet.dev." + id + ".facts"},
		{"DeviceEvents", DeviceEvents(id), "fleet.dev." + id + ".events"},
		{"DesiredGetFor", DesiredGetFor(id), "fleet.desired." + id},
		{"DeviceInboxPrefix", DeviceInboxPrefix("berlin", id), "_INBOX_DEV.berlin." + id},
		{"DeviceInboxPrefix hub", DeviceInboxPrefix(DefaultSite, id), "_INBOX_DEV.hub." + id},
		{"DeviceNotify", DeviceNotify("berlin", id), "_INBOX_DEV.berlin." + id + ".desired"},
		{"DeviceCmd", DeviceCmd(DefaultSite, id), "_INBOX_DEV.hub." + id + ".cmd"},
		{"SiteInboxes", SiteInboxes("berlin"), "_INBOX_DEV.berlin.>"},
		{"SiteTag", SiteTag("berlin"), "site:berlin"},
		{"APIReadVerb", APIReadVerb("devices"), "fleet.api.read.devices"},
		{"APIWriteVerb", APIWriteVerb("deploy"), "fleet.api.write.deploy"},
		{"AuditSubject", AuditSubject("deploy"), "fleet.audit.deploy"},
		{"InboxPrefix", InboxPrefix(id), "_INBOX_" + id},
		{"JSAPIPrefix", JSAPIPrefix("fleet"), "$JS.fleet.API"},
		{"JSAPIPrefix local", JSAPIPrefix(""), "$JS.API"},
		{"KVStream", KVStream(BucketDesired), "KV_fleet_desired"},
		{"KVKey", KVKey(BucketDesired, id), "$KV.fleet_desired." + id},
		{"DirectGetLast", DirectGetLast("site", StreamFacts, DeviceFacts(id)),
			"$JS.site.API.DIRECT.GET.FLEET_FACTS.fleet.dev." + id + ".facts"},
		{"DesiredRepublishSource", DesiredRepublishSource, "$KV.fleet_desired.*"},
		{"DesiredRepublishDest", DesiredRepublishDest, "fleet.dev.{{wildcard(1)}}.desired"},
		{"AllDesired", AllDesired, "fleet.dev.*.desired"},
		{"AllFacts", AllFacts, "fleet.dev.*.facts"},
		{"AllEvents", AllEvents, "fleet.dev.*.events"},
		{"AllDesiredGet", AllDesiredGet, "fleet.desired.*"},
		{"AllAudit", AllAudit, "fleet.audit.>"},
		{"AccountConnect", AccountConnect("ACC"), "$SYS.ACCOUNT.ACC.CONNECT"},
		{"AccountDisconnect", AccountDisconnect("ACC"), "$SYS.ACCOUNT.ACC.DISCONNECT"},
		{"AccountClaimsUpdate", AccountClaimsUpdate("ACC"), "$SYS.REQ.ACCOUNT.ACC.CLAIMS.UPDATE"},
	}
	for _, c := range cases {
		if c.got != c.want {
			t.Errorf("%s = %q, want %q", c.name, c.got, c.want)
		}
	}
	if DefaultSite != "hub" || !ValidSite(DefaultSite) {
		t.Errorf("DefaultSite = %q", DefaultSite)
	}
	if AccountCore == AccountFleet || AccountCore == AccountSystem || AccountFleet == AccountSystem {
		t.Errorf("account names are not distinct: %s %s %s", AccountCore, AccountFleet, AccountSystem)
	}
	// Every built per-device subject is matched by its filter, and the
	// filter of another kind matches none of them.
	other := newDevice(t)
	filters := map[string]string{
		DeviceFacts(id): AllFacts, DeviceEvents(id): AllEvents, DesiredGetFor(id): AllDesiredGet,
	}
	for subj, filter := range filters {
		for s2, f2 := range filters {
			if got := server.SubjectMatchesFilter(subj, f2); got != (f2 == filter) {
				t.Errorf("%s matches %s = %v (built for %s)", subj, f2, got, s2)
			}
		}
		if subj == DeviceFacts(other) || subj == DesiredGetFor(other) {
			t.Errorf("%s is also another device's subject", subj)
		}
	}
}

// A device ID that is not a single plain token must never widen a subject.
func TestBuildersRefuseWildcardIDs(t *testing.T) {
	for _, id := range []string{"", "*", ">", "a.b", "U*", "a b", "a\tb", "a\nb", "a\r"} {
		for name, got := range map[string]string{
			"DeviceDesired": DeviceDesired(id),
			"DeviceFacts":   DeviceFacts(id),
			"DeviceEvents":  DeviceEvents(id),
		} {
			if !strings.HasPrefix(got, "fleet.dev.invalid.") {
				t.Errorf("%s(%q) = %q, want the fleet.dev.invalid. guard", name, id, got)
			}
			if strings.Count(got, ".") != 3 {
				t.Errorf("%s(%q) = %q has more than four tokens", name, id, got)
			}
		}
		// The desired get refuses anything but a canonical device ID.
		if got := DesiredGetFor(id); got != DesiredGet+".invalid" {
			t.Errorf("DesiredGetFor(%q) = %q, want %s.invalid", id, got, DesiredGet)
		}
	}
	user := newDevice(t)
	for _, id := range []string{strings.ToLower(user), user + "A", user[:len(user)-1]} {
		if got := DesiredGetFor(id); got != DesiredGet+".invalid" {
			t.Errorf("DesiredGetFor(%q) = %q, want %s.invalid", id, got, DesiredGet)
		}
	}
}

// Triggers and commands lie in the device's own inbox at its site: only
// that device's inbox filter, and its site's, match them.
func TestDeviceInboxes(t *testing.T) {
	a, b := newDevice(t), newDevice(t)
	for _, site := range []string{DefaultSite, "berlin"} {
		for name, s := range map[string]string{"DeviceNotify": DeviceNotify(site, a), "DeviceCmd": DeviceCmd(site, a)} {
			if !server.IsValidLiteralSubject(s) {
				t.Errorf("%s(%s) = %q is not a literal subject", name, site, s)
			}
			if !InInbox(s, DeviceInboxPrefix(site, a)) {
				t.Errorf("%s(%s) = %q is not in the device's inbox", name, site, s)
			}
			if !server.SubjectMatchesFilter(s, SiteInboxes(site)) {
				t.Errorf("%s(%s) = %q is not in its site's inboxes", name, site, s)
			}
			for _, foreign := range []string{DeviceInboxPrefix(site, b) + ".>", DeviceInboxPrefix("paris", a) + ".>", SiteInboxes("paris"), InboxPrefix(a) + ".>"} {
				if server.SubjectMatchesFilter(s, foreign) {
					t.Errorf("%s(%s) = %q matches %s", name, site, s, foreign)
				}
			}
			gotSite, gotKey, ok := DeviceInboxOf(s)
			if !ok || gotSite != site || gotKey != a {
				t.Errorf("DeviceInboxOf(%q) = %q, %q, %v", s, gotSite, gotKey, ok)
			}
			if _, ok := DeviceFromSubject(s); ok {
				t.Errorf("%q is taken for a subject a device sends", s)
			}
		}
	}
	if DeviceNotify(DefaultSite, a) == DeviceCmd(DefaultSite, a) {
		t.Error("trigger and command share a subject")
	}
}

func TestValidDeviceID(t *testing.T) {
	user := newDevice(t)
	acc, _ := nkeys.CreateAccount()
	accPub, _ := acc.PublicKey()
	seed, _ := acc.Seed()
	for _, c := range []struct {
		id   string
		want bool
	}{
		{user, true},
		{"", false},
		{"U", false},
		{accPub, false},
		{string(seed), false},
		{user[:len(user)-1], false},
		{user + "A", false},
		{strings.ToLower(user), false},
		{user[:10] + "*" + user[11:], false},
	} {
		if got := ValidDeviceID(c.id); got != c.want {
			t.Errorf("ValidDeviceID(%q) = %v, want %v", c.id, got, c.want)
		}
		if err := CheckDeviceID(c.id); (err == nil) != c.want {
			t.Errorf("CheckDeviceID(%q) = %v", c.id, err)
		}
	}
	if err := CheckDeviceID("nope"); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("CheckDeviceID error should name the bad ID, got %v", err)
	}
}

func TestDeviceFromSubject(t *testing.T) {
	id := newDevice(t)
	for _, s := range []string{DeviceFacts(id), DeviceEvents(id), DeviceDesired(id)} {
		got, ok := DeviceFromSubject(s)
		if !ok || got != id {
			t.Errorf("DeviceFromSubject(%q) = %q, %v; want %q, true", s, got, ok, id)
		}
	}
	acc, _ := nkeys.CreateAccount()
	accPub, _ := acc.PublicKey()
	for _, s := range []string{
		"",
		"fleet.dev." + id,
		"fleet.dev." + id + ".",
		"fleet.dev." + id + ".>",
		"fleet.dev." + id + ".*",
		"fleet.dev." + id + ".facts.extra",
		"fleet.dev.*.facts",
		"fleet.dev.>",
		"fleet.dev.invalid.facts",
		"fleet.dev." + accPub + ".facts",
		"fleet.api." + id + ".facts",
		"fleet.devs." + id + ".facts",
		"fleetx.dev." + id + ".facts",
		"$KV.fleet_desired." + id,
		"fleet.dev." + id + ".fa cts",
		DesiredGetFor(id),
		DeviceCmd(DefaultSite, id),
		DeviceNotify("berlin", id),
		DeviceInboxPrefix(DefaultSite, id) + ".facts",
	} {
		if got, ok := DeviceFromSubject(s); ok {
			t.Errorf("DeviceFromSubject(%q) = %q, true; want false", s, got)
		}
	}
}

func TestValidSite(t *testing.T) {
	for _, s := range []string{"hub", "berlin", "a", "0", "site-1", "a-", "x9", strings.Repeat("a", 63)} {
		if !ValidSite(s) {
			t.Errorf("ValidSite(%q) = false", s)
		}
		if !server.IsValidLiteralSubject(s) || strings.Contains(s, ".") {
			t.Errorf("valid site %q is not one literal token", s)
		}
		if SiteTag(s) != "site:"+s {
			t.Errorf("SiteTag(%q) = %q", s, SiteTag(s))
		}
	}
	for _, s := range []string{
		"", "-a", "Berlin", "BERLIN", "a.b", "*", ">", "a*", "a>", "a b", " a", "a\n", "a\t", "a_b",
		"a:b", "ä", "berlin\x00", strings.Repeat("a", 64), "_INBOX", "$SYS",
	} {
		if ValidSite(s) {
			t.Errorf("ValidSite(%q) = true", s)
		}
	}
}

func TestInInbox(t *testing.T) {
	id, other := newDevice(t), newDevice(t)
	dev := DeviceInboxPrefix(DefaultSite, id)
	admin := InboxPrefix(id)
	for _, c := range []struct {
		reply, prefix string
		want          bool
	}{
		{dev + ".r", dev, true},
		{dev + ".r.s.t", dev, true},
		{DeviceNotify(DefaultSite, id), dev, true},
		{admin + ".abc", admin, true},
		// The prefix alone, or with an empty tail, is no reply subject.
		{dev, dev, false},
		{dev + ".", dev, false},
		{"", dev, false},
		// A prefix is a whole token: a longer token is someone else's.
		{dev + "X.r", dev, false},
		{dev + "_r", dev, false},
		{admin + "X.r", admin, false},
		{"_INBOX_DEV.hub." + id[:20] + ".r", dev, false},
		{"_INBOX_DEV.hub.r", "_INBOX_DEV.h", false},
		// Another site, another key, another kind of inbox.
		{DeviceInboxPrefix("berlin", id) + ".r", dev, false},
		{DeviceInboxPrefix(DefaultSite, other) + ".r", dev, false},
		{admin + ".r", dev, false},
		{dev + ".r", admin, false},
		{"_INBOX." + id + ".r", admin, false},
		{"x" + dev + ".r", dev, false},
		{strings.ToLower(dev) + ".r", dev, false},
	} {
		if got := InInbox(c.reply, c.prefix); got != c.want {
			t.Errorf("InInbox(%q, %q) = %v, want %v", c.reply, c.prefix, got, c.want)
		}
	}
}

func TestAdminInboxKey(t *testing.T) {
	id := newDevice(t)
	for _, r := range []string{InboxPrefix(id) + ".r", InboxPrefix(id) + ".a.b.c"} {
		if key, ok := AdminInboxKey(r); !ok || key != id {
			t.Errorf("AdminInboxKey(%q) = %q, %v; want %q", r, key, ok, id)
		}
	}
	acc, _ := nkeys.CreateAccount()
	accPub, _ := acc.PublicKey()
	for _, r := range []string{
		"",
		"_INBOX_",
		"_INBOX_.r",
		InboxPrefix(id),
		InboxPrefix(id) + ".",
		"_INBOX." + id + ".r",
		"_INBOX_" + strings.ToLower(id) + ".r",
		"_INBOX_" + id[:55] + ".r",
		"_INBOX_" + id + "A.r",
		"_INBOX_" + accPub + ".r",
		"x_INBOX_" + id + ".r",
		DeviceInboxPrefix(DefaultSite, id) + ".r",
		DeviceNotify("berlin", id),
		DeviceFacts(id),
	} {
		if key, ok := AdminInboxKey(r); ok || key != "" {
			t.Errorf("AdminInboxKey(%q) = %q, %v; want false", r, key, ok)
		}
	}
}

func TestDeviceInboxOf(t *testing.T) {
	id := newDevice(t)
	for _, c := range []struct{ reply, site string }{
		{DeviceInboxPrefix(DefaultSite, id) + ".r", DefaultSite},
		{DeviceInboxPrefix("berlin", id) + ".a.b", "berlin"},
		{DeviceCmd("site-2", id), "site-2"},
		{DeviceNotify("x", id), "x"},
	} {
		site, key, ok := DeviceInboxOf(c.reply)
		if !ok || site != c.site || key != id {
			t.Errorf("DeviceInboxOf(%q) = %q, %q, %v; want %q, %q", c.reply, site, key, ok, c.site, id)
		}
	}
	acc, _ := nkeys.CreateAccount()
	accPub, _ := acc.PublicKey()
	for _, r := range []string{
		"",
		"_INBOX_DEV",
		"_INBOX_DEV.",
		"_INBOX_DEV.hub",
		"_INBOX_DEV.hub.",
		DeviceInboxPrefix(DefaultSite, id),
		DeviceInboxPrefix(DefaultSite, id) + ".",
		"_INBOX_DEV." + id + ".r",
		"_INBOX_DEV." + id + ".r.s",
		"_INBOX_DEV..." + id + ".r",
		"_INBOX_DEV.." + id + ".r",
		"_INBOX_DEV.*." + id + ".r",
		"_INBOX_DEV.>." + id + ".r",
		"_INBOX_DEV.Berlin." + id + ".r",
		"_INBOX_DEV.-x." + id + ".r",
		"_INBOX_DEV.hub.*.r",
		"_INBOX_DEV.hub.>",
		"_INBOX_DEV.hub." + strings.ToLower(id) + ".r",
		"_INBOX_DEV.hub." + accPub + ".r",
		"_INBOX_DEVX.hub." + id + ".r",
		"_INBOX.DEV.hub." + id + ".r",
		"x_INBOX_DEV.hub." + id + ".r",
		InboxPrefix(id) + ".r",
		DeviceFacts(id),
		DesiredGetFor(id),
	} {
		if site, key, ok := DeviceInboxOf(r); ok || site != "" || key != "" {
			t.Errorf("DeviceInboxOf(%q) = %q, %q, %v; want false", r, site, key, ok)
		}
	}
}

func TestInboxPrefixFor(t *testing.T) {
	id := newDevice(t)
	for _, r := range Roles {
		got := InboxPrefixFor(r, "berlin", id)
		switch r {
		case RoleAgent, RolePending, RoleEnroll:
			if got != DeviceInboxPrefix("berlin", id) {
				t.Errorf("InboxPrefixFor(%s) = %q, want the device inbox", r, got)
			}
		default:
			if got != InboxPrefix(id) {
				t.Errorf("InboxPrefixFor(%s) = %q, want the admin inbox", r, got)
			}
		}
	}
}

func TestParseRole(t *testing.T) {
	if len(Roles) != 8 {
		t.Errorf("Roles = %v", Roles)
	}
	for _, r := range Roles {
		got, err := ParseRole(string(r))
		if err != nil || got != r {
			t.Errorf("ParseRole(%q) = %q, %v", r, got, err)
		}
	}
	if r, err := ParseRole("pending"); err != nil || r != RolePending {
		t.Errorf("ParseRole(pending) = %q, %v", r, err)
	}
	for _, s := range []string{"", "Owner", "admin", "owner ", "core", "service"} {
		if _, err := ParseRole(s); err == nil {
			t.Errorf("ParseRole(%q) succeeded", s)
		}
	}
	for _, r := range AdminRoles {
		if !slices.Contains(Roles, r) {
			t.Errorf("admin role %s is not a role", r)
		}
	}
}

// The roles whose users carry a site tag (accounts.IssueSiteUser): devices,
// enrolling bearers, and leaf links.
var siteRoles = []Role{RoleAgent, RolePending, RoleEnroll, RoleLeaf}

var deviceRoles = []Role{RoleAgent, RolePending, RoleEnroll}

// filled is a role template as the server applies it to the user with key
// pub and site tag site: {{subject()}} and {{tag(site)}} filled in.
type filled struct {
	role     Role
	pub      string
	site     string
	Pub, Sub []string
}

func fill(r Role, pub, site string) filled {
	tpl := RoleTemplate(r)
	rep := strings.NewReplacer("{{subject()}}", pub, "{{tag(site)}}", site)
	expand := func(fs []string) []string {
		out := make([]string, len(fs))
		for i, f := range fs {
			out[i] = rep.Replace(f)
		}
		return out
	}
	return filled{role: r, pub: pub, site: site, Pub: expand(tpl.Pub), Sub: expand(tpl.Sub)}
}

// siteOf is the site a user of role r is tagged with in these tests.
func siteOf(r Role, site string) string {
	if slices.Contains(siteRoles, r) {
		return site
	}
	return ""
}

func collides(filters []string, subj string) (string, bool) {
	for _, f := range filters {
		if server.SubjectsCollide(f, subj) {
			return f, true
		}
	}
	return "", false
}

// may checks that the filters allow each of subjs.
func may(t *testing.T, who, op string, filters []string, subjs ...string) {
	t.Helper()
	for _, s := range subjs {
		if _, ok := collides(filters, s); !ok {
			t.Errorf("%s may not %s %q (%v)", who, op, s, filters)
		}
	}
}

// mayNot checks that the filters allow none of subjs.
func mayNot(t *testing.T, who, op string, filters []string, subjs ...string) {
	t.Helper()
	for _, s := range subjs {
		if f, ok := collides(filters, s); ok {
			t.Errorf("%s may %s %q through %q", who, op, s, f)
		}
	}
}

// Every template expands, for every site, into valid subject filters; it
// names only {{subject()}} and, for the roles that carry a site tag,
// {{tag(site)}} with the tag name SiteTag writes.
func TestRoleTemplatesExpand(t *testing.T) {
	tagName, _, _ := strings.Cut(SiteTag("x"), ":")
	siteFn := "{{tag(" + tagName + ")}}"
	user := newDevice(t)
	for _, r := range Roles {
		tpl := RoleTemplate(r)
		if len(tpl.Pub) == 0 || len(tpl.Sub) == 0 {
			t.Errorf("role %s: empty template %+v", r, tpl)
		}
		usesSite := false
		for _, f := range slices.Concat(tpl.Pub, tpl.Sub) {
			rest := strings.ReplaceAll(strings.ReplaceAll(f, "{{subject()}}", ""), siteFn, "")
			if strings.Contains(rest, "{{") || strings.Contains(rest, "}}") {
				t.Errorf("role %s: %q uses a template function other than subject() and %s", r, f, siteFn)
			}
			usesSite = usesSite || strings.Contains(f, siteFn)
		}
		if usesSite && !slices.Contains(siteRoles, r) {
			t.Errorf("role %s has no site tag, but its template names %s", r, siteFn)
		}
		if slices.Contains(siteRoles, r) && !usesSite {
			t.Errorf("role %s: its template does not confine it to its site", r)
		}
		for _, site := range []string{DefaultSite, "berlin", "a-1"} {
			u := fill(r, user, siteOf(r, site))
			for _, f := range slices.Concat(u.Pub, u.Sub) {
				if !server.IsValidSubject(f) || strings.Contains(f, "{{") {
					t.Errorf("role %s at %s: %q is not a valid subject filter", r, site, f)
				}
			}
		}
		// No role answers requests (allow_responses would let it publish
		// to any reply subject it is handed); only enroll is a bearer, and
		// only the leaf is bound to leaf node connections.
		if tpl.Bearer != (r == RoleEnroll) {
			t.Errorf("role %s: bearer = %v", r, tpl.Bearer)
		}
		if r == RoleLeaf {
			if !slices.Equal(tpl.ConnTypes, []string{"LEAFNODE"}) {
				t.Errorf("leaf role must be bound to LEAFNODE connections, got %v", tpl.ConnTypes)
			}
		} else if len(tpl.ConnTypes) != 0 {
			t.Errorf("role %s: unexpected connection types %v", r, tpl.ConnTypes)
		}
		if r != RoleLeaf && (tpl.MaxSubs <= 0 || tpl.MaxSubs > 1024) {
			t.Errorf("role %s: MaxSubs = %d, want a bound", r, tpl.MaxSubs)
		}
		if slices.Contains(deviceRoles, r) && (tpl.MaxPayload <= 0 || tpl.MaxPayload > 1<<20) {
			t.Errorf("device role %s: MaxPayload = %d, want a bound", r, tpl.MaxPayload)
		}
	}
	if got := RoleTemplate("nope"); len(got.Pub)+len(got.Sub) != 0 || got.Bearer {
		t.Errorf("unknown role got a template: %+v", got)
	}
}

// Every role receives its own inbox and nothing else: never all inboxes,
// everything, another user's inbox, or its inbox at another site.
func TestNoRoleSubscribesForeignInboxes(t *testing.T) {
	user, other := newDevice(t), newDevice(t)
	for _, r := range Roles {
		for _, site := range []string{DefaultSite, "berlin"} {
			if r == RoleLeaf && site == DefaultSite {
				continue // the hub is no leaf's site
			}
			u := fill(r, user, siteOf(r, site))
			who := string(r) + "@" + site
			own := InboxPrefixFor(r, site, user) + ".>"
			if r == RoleLeaf {
				own = SiteInboxes(site)
			}
			for _, f := range u.Sub {
				if f == ">" || f == "_INBOX.>" || strings.HasPrefix(f, "*") || strings.HasPrefix(f, "_INBOX_DEV.*") {
					t.Errorf("%s: subscribe filter %q is too wide", who, f)
				}
				if !server.SubjectMatchesFilter(f, own) {
					t.Errorf("%s: subscribe filter %q lies outside its own inbox %s", who, f, own)
				}
			}
			may(t, who, "subscribe", u.Sub, strings.TrimSuffix(own, ">")+"r")
			otherSite := "paris"
			mayNot(t, who, "subscribe", u.Sub,
				"_INBOX.x", "_INBOX.x.y", "x", "$SYS.x", "$JS.API.INFO",
				InboxPrefix(other)+".r", "_INBOX_"+other+".x", DeviceInboxPrefix(otherSite, user)+".r",
				DeviceNotify(otherSite, user), DeviceCmd(otherSite, other),
				Enroll, DeviceFacts(other), DeviceEvents(other), DeviceDesired(other), DesiredGetFor(other),
				APIReadVerb(VerbDevices), APIWriteVerb(VerbTokenCreate), AuditSubject(VerbDeploy),
				KVKey(BucketTokens, "x"))
			if r != RoleLeaf {
				// A device's inbox is its own; only its site's link
				// carries all of the site's.
				mayNot(t, who, "subscribe", u.Sub, DeviceInboxPrefix(site, other)+".r", DeviceNotify(site, other), DeviceCmd(site, other))
			}
			if site != DefaultSite {
				// Its own key at the hub is another inbox.
				mayNot(t, who, "subscribe", u.Sub, DeviceInboxPrefix(DefaultSite, user)+".r", DeviceNotify(DefaultSite, user))
			}
			if !slices.Contains(siteRoles, r) {
				mayNot(t, who, "subscribe", u.Sub, DeviceInboxPrefix(DefaultSite, user)+".r", DeviceInboxPrefix("berlin", user)+".r")
			}
		}
	}
}

// No role may send a subject it may also receive: a client could
// otherwise talk to itself, or to its peers, without the coordinator in
// between. For the leaf this is the link: what the site sends never comes
// back over it.
func TestNoEchoPath(t *testing.T) {
	user := newDevice(t)
	for _, r := range Roles {
		for _, site := range []string{DefaultSite, "berlin"} {
			u := fill(r, user, siteOf(r, site))
			for _, p := range u.Pub {
				if f, ok := collides(u.Sub, p); ok {
					t.Errorf("role %s@%s may publish %q and subscribe %q", r, site, p, f)
				}
			}
		}
	}
	sys := SiteSystemTemplate()
	for _, p := range sys.Pub {
		if f, ok := collides(sys.Sub, p); ok {
			t.Errorf("a site's system link may send %q and receive %q", p, f)
		}
	}
}

// No client reaches another client directly, whatever their roles and
// sites: whatever one may send, none may receive. Everything between
// clients passes the coordinator, which validates it.
func TestNoClientToClientPath(t *testing.T) {
	a, b := newDevice(t), newDevice(t)
	var users []filled
	for _, r := range Roles {
		for _, site := range []string{DefaultSite, "berlin"} {
			users = append(users, fill(r, a, siteOf(r, site)), fill(r, b, siteOf(r, site)))
		}
	}
	for _, from := range users {
		for _, to := range users {
			for _, p := range from.Pub {
				if f, ok := collides(to.Sub, p); ok {
					t.Errorf("%s@%s (%s) publishes %q, which %s@%s (%s) receives through %q",
						from.role, from.site, from.pub[:8], p, to.role, to.site, to.pub[:8], f)
				}
			}
		}
	}
}

// The agent template, filled in for device A, touches only A's subjects.
func TestAgentTemplateIsolatesDevices(t *testing.T) {
	a, b := newDevice(t), newDevice(t)
	for _, site := range []string{DefaultSite, "berlin"} {
		u := fill(RoleAgent, a, site)
		who := "agent@" + site
		may(t, who, "publish", u.Pub, DeviceFacts(a), DeviceEvents(a), DesiredGetFor(a), PayloadSyncFor(a), EscrowPutFor(a), CacheGetFor(a), SiteNar, SiteNarInfoFor("x"))
		for _, p := range u.Pub {
			// SiteNar and SiteNarInfo: read-only direct gets of a site's
			// cache mirrors, shared by every device (FLEET's imports).
			if p != DeviceFacts(a) && p != DeviceEvents(a) && p != DesiredGetFor(a) && p != PayloadSyncFor(a) && p != EscrowPutFor(a) && p != CacheGetFor(a) && p != SiteNar && p != SiteNarInfo+".*" {
				t.Errorf("%s may publish %q beyond its facts, events, desired get, payload sync, escrow and cache reads", who, p)
			}
		}
		mayNot(t, who, "publish", u.Pub,
			DeviceFacts(b), DeviceEvents(b), DesiredGetFor(b), PayloadSyncFor(b), EscrowPutFor(b), CacheGetFor(b),
			APIWriteVerb(VerbCachePut), CacheChunk("c", "u"), KVKey(BucketNarInfo, "x"), "$O."+ObjectCache+".C.x", CacheDirect,
			DevicePayloadsNotify(site, a), DeviceEscrowNotify(site, b),
			DeviceDesired(a), DeviceDesired(b), DeviceNotify(site, a), DeviceNotify(site, b),
			DeviceCmd(site, a), DeviceCmd(site, b), DeviceInboxPrefix(site, b)+".r", InboxPrefix(b)+".r", "_INBOX.r",
			Enroll, APIReadVerb(VerbDevices), APIWriteVerb(VerbDeploy), AuditSubject("x"),
			JSAPIPrefix(Domain)+".STREAM.INFO."+StreamFacts, JSAPIPrefix("")+".STREAM.INFO."+KVStream(BucketDesired),
			DirectGetLast(Domain, KVStream(BucketDesired), KVKey(BucketDesired, a)),
			DirectGetLast("", KVStream(BucketDevices), KVKey(BucketDevices, a)),
			KVKey(BucketDesired, a), AccountConnect("ACC"), ClaimsUpdate)
		may(t, who, "subscribe", u.Sub, DeviceNotify(site, a), DeviceCmd(site, a), DeviceInboxPrefix(site, a)+".r")
		mayNot(t, who, "subscribe", u.Sub,
			DeviceNotify(site, b), DeviceCmd(site, b), DeviceInboxPrefix(site, b)+".r", InboxPrefix(a)+".r",
			DeviceFacts(a), DesiredGetFor(a), DeviceDesired(a), Enroll, "fleet.enroll")
	}
}

// A pending device and an enrolling bearer may only ask the coordinator
// (enrollment), and hear only their own inbox.
func TestPendingAndEnrollTemplates(t *testing.T) {
	a, b := newDevice(t), newDevice(t)
	for _, r := range []Role{RolePending, RoleEnroll} {
		for _, site := range []string{DefaultSite, "berlin"} {
			u := fill(r, a, site)
			who := string(r) + "@" + site
			if !slices.Equal(u.Pub, []string{Enroll}) {
				t.Errorf("%s may publish %v, want only %s", who, u.Pub, Enroll)
			}
			mayNot(t, who, "publish", u.Pub, DeviceFacts(a), DeviceEvents(a), DesiredGetFor(a),
				APIReadVerb(VerbDevices), DeviceInboxPrefix(site, b)+".r", Enroll+".x")
			may(t, who, "subscribe", u.Sub, DeviceInboxPrefix(site, a)+".r")
			mayNot(t, who, "subscribe", u.Sub, DeviceInboxPrefix(site, b)+".r", Enroll, DeviceNotify("paris", a))
		}
	}
	if !RoleTemplate(RoleEnroll).Bearer || RoleTemplate(RolePending).Bearer {
		t.Error("enroll must be a bearer role, pending must prove its key")
	}
}

func TestAdminTemplates(t *testing.T) {
	u := newDevice(t)
	dev := newDevice(t)
	type check struct {
		subj string
		pub  bool
	}
	// What no admin role may send itself: device subjects, enrollment,
	// the JetStream API (the state is in CORE) and $SYS.
	common := []check{
		{Enroll, false}, {DeviceFacts(dev), false}, {DeviceEvents(dev), false}, {DesiredGetFor(dev), false},
		{DeviceDesired(dev), false}, {DeviceNotify(DefaultSite, dev), false}, {DeviceCmd(DefaultSite, dev), false},
		{DeviceCmd("berlin", dev), false}, {InboxPrefix(dev) + ".r", false}, {"_INBOX.r", false},
		{JSAPIPrefix(Domain) + ".STREAM.INFO." + StreamFacts, false}, {JSAPIPrefix("") + ".STREAM.DELETE." + StreamAudit, false},
		{DirectGetLast(Domain, StreamEvents, DeviceEvents(dev)), false}, {KVKey(BucketAdmins, u), false},
		{AuditSubject(VerbDeploy), false}, {AccountConnect("ACC"), false}, {ClaimsUpdate, false},
	}
	cases := map[Role][]check{
		RoleViewer: {
			// Write verbs reach the coordinator, which refuses and audits them.
			{APIReadVerb(VerbDevices), true}, {APIReadVerb(VerbAudit), true}, {APIWriteVerb(VerbDeploy), true},
		},
		RoleOperator: {
			{APIReadVerb(VerbDevices), true}, {APIWriteVerb(VerbDeploy), true}, {APIWriteVerb(VerbRolloutAction), true},
		},
		RoleOwner: {
			{APIWriteVerb(VerbTokenCreate), true}, {APIWriteVerb(VerbAdminAdd), true}, {APIReadVerb(VerbTokens), true},
		},
		RoleObserver: {
			{APIReadVerb(VerbDevices), true}, {APIReadVerb(VerbStatus), true}, {APIReadVerb(VerbFacts), true},
			{APIReadVerb(VerbTokens), false}, {APIReadVerb(VerbAdmins), false}, {APIReadVerb(VerbAudit), false},
			{APIReadVerb(VerbDevice), false}, {APIWriteVerb(VerbDeploy), false}, {APIWriteVerb(VerbTokenCreate), false},
		},
	}
	for _, r := range AdminRoles {
		f := fill(r, u, "")
		for _, c := range append(cases[r], common...) {
			if _, ok := collides(f.Pub, c.subj); ok != c.pub {
				t.Errorf("role %s publish %s: allowed=%v, want %v", r, c.subj, ok, c.pub)
			}
		}
		for _, p := range f.Pub {
			if !strings.HasPrefix(p, APIRead+".") && !strings.HasPrefix(p, APIWrite+".") {
				t.Errorf("role %s may publish %q outside the admin API", r, p)
			}
		}
		if !slices.Equal(f.Sub, []string{InboxPrefix(u) + ".>"}) {
			t.Errorf("role %s subscribes %v, want only its own inbox", r, f.Sub)
		}
	}
	if len(cases) != len(AdminRoles) {
		t.Errorf("admin roles %v, checked %d", AdminRoles, len(cases))
	}
}

// The leaf link carries the site's device requests into the hub and its
// own devices' inboxes back: no triggers or commands it could forge, no
// inbox, no admin API, no presence, and no other site's replies.
func TestLeafTemplate(t *testing.T) {
	dev, other := newDevice(t), newDevice(t)
	for _, site := range []string{"berlin", "site-2"} {
		u := fill(RoleLeaf, newDevice(t), site)
		who := "leaf@" + site
		may(t, who, "send", u.Pub, DeviceFacts(dev), DeviceEvents(dev), DesiredGetFor(dev), DesiredGetFor(other), Enroll)
		mayNot(t, who, "send", u.Pub,
			// Desired triggers and commands, at any site.
			DeviceDesired(dev), DeviceNotify(site, dev), DeviceNotify(DefaultSite, dev), DeviceCmd(site, dev), DeviceCmd("paris", dev),
			// Inboxes: devices', admins', the default one.
			DeviceInboxPrefix(site, dev)+".r", DeviceInboxPrefix(DefaultSite, dev)+".r", InboxPrefix(dev)+".r", "_INBOX.r",
			// The admin API, the audit, JetStream and the buckets.
			APIReadVerb(VerbDevices), APIWriteVerb(VerbDeploy), APIWriteVerb(VerbLeafConfig), AuditSubject("x"),
			JSAPIPrefix(Domain)+".STREAM.DELETE."+StreamAudit, JSAPIPrefix("")+".STREAM.INFO."+KVStream(BucketAdmins),
			DirectGetLast("", KVStream(BucketDesired), KVKey(BucketDesired, dev)), KVKey(BucketAdmins, "x"),
			// Presence and account updates.
			AccountConnect("ACC"), AccountDisconnect("ACC"), "$SYS.ACCOUNT.ACC.CONNECT", ClaimsUpdate, AccountClaimsUpdate("ACC"),
			// Device subjects that are not facts or events.
			"fleet.dev."+dev+".cmd", Enroll+".x", DesiredGet+"."+dev+".x")
		may(t, who, "receive", u.Sub, DeviceNotify(site, dev), DeviceCmd(site, other), DeviceInboxPrefix(site, dev)+".r")
		for _, f := range u.Sub {
			if !server.SubjectMatchesFilter(f, SiteInboxes(site)) {
				t.Errorf("%s receives %q beyond its site's inboxes", who, f)
			}
		}
		mayNot(t, who, "receive", u.Sub,
			DeviceNotify(DefaultSite, dev), DeviceCmd(DefaultSite, dev), DeviceInboxPrefix(DefaultSite, dev)+".r",
			DeviceNotify("paris", dev), DeviceInboxPrefix("paris", dev)+".r", "_INBOX_DEV."+site+"x."+dev+".r",
			InboxPrefix(dev)+".r", "_INBOX.r", Enroll, DeviceFacts(dev), DeviceDesired(dev), DesiredGetFor(dev),
			APIReadVerb(VerbDevices), "$SYS.ACCOUNT.ACC.CONNECT")
	}
}

// A site's system link learns account updates; it can neither answer
// them (a rogue site would answer the coordinator's push first, with an
// error of its choosing), nor push account JWTs, nor reach server
// requests, nor report presence (a rogue site could show any device
// online), nor read anyone's replies but the leaf's own lookups.
func TestSiteSystemTemplate(t *testing.T) {
	tpl := SiteSystemTemplate()
	if !slices.Equal(tpl.ConnTypes, []string{"LEAFNODE"}) {
		t.Fatalf("site system link must be a leaf node connection, got %v", tpl.ConnTypes)
	}
	mayNot(t, "a site", "send", tpl.Pub,
		ClaimsUpdate, AccountClaimsUpdate("ACC"), "$SYS.ACCOUNT.ACC.CLAIMS.UPDATE",
		AccountConnect("ACC"), AccountDisconnect("ACC"), "$SYS.ACCOUNT.ACC.LEAFNODE.CONNECT",
		"$SYS.SERVER.ACCOUNT.ACC.CONNS", "$SYS.REQ.SERVER.PING", "$SYS.REQ.SERVER.X.KICK",
		"$SYS.REQ.ACCOUNT.ACC.CONNZ", Enroll, APIWriteVerb(VerbDeploy), DeviceFacts(newDevice(t)), "_INBOX.r")
	may(t, "a site", "send", tpl.Pub, "$SYS.REQ.ACCOUNT.ACC.CLAIMS.LOOKUP")
	mayNot(t, "a site", "receive", tpl.Sub,
		"_INBOX.x", InboxPrefix(newDevice(t))+".x", "$SYS.REQ.SERVER.PING", Enroll,
		AccountConnect("ACC"), AccountDisconnect("ACC"), "$SYS.REQ.ACCOUNT.ACC.CLAIMS.LOOKUP")
	may(t, "a site", "receive", tpl.Sub, AccountClaimsUpdate("ACC"), "$SYS.ACCOUNT.ACC.CLAIMS.UPDATE", "$SYS._INBOX.x.y")
	for _, f := range slices.Concat(tpl.Pub, tpl.Sub) {
		if !server.IsValidSubject(f) || strings.Contains(f, "{{") {
			t.Errorf("site system template: %q is not a plain subject filter", f)
		}
	}
}

// The coordinator's import of direct gets on the hub's NAR files is its
// own: no role may send it (a client could read any chunk into any inbox).
func TestNoRoleSendsCacheDirect(t *testing.T) {
	a := newDevice(t)
	for _, r := range Roles {
		for _, site := range []string{DefaultSite, "berlin"} {
			u := fill(r, a, siteOf(r, site))
			mayNot(t, string(r)+"@"+site, "publish", u.Pub, CacheDirect)
		}
	}
}

// A site's cache link may send only its own consumers' resets and flow
// control and its answers, and receive only its own deliveries, its
// domain's stream API and reset replies; SITELINK imports of CORE only
// those consumers' subjects and the deliveries.
func TestSiteCacheTemplate(t *testing.T) {
	tm := SiteCacheTemplate("berlin")
	for _, p := range tm.Pub {
		if !strings.Contains(p, "berlin") || strings.HasPrefix(p, "$JS.API") || strings.HasPrefix(p, "$KV") || strings.Contains(p, ">") {
			t.Errorf("a site's link may publish %q", p)
		}
	}
	for _, s := range tm.Sub {
		if s != "$JSC.R.>" && !strings.Contains(s, "berlin") {
			t.Errorf("a site's link may receive %q", s)
		}
	}
	if !slices.Equal(tm.ConnTypes, []string{"LEAFNODE"}) {
		t.Errorf("conn types %v", tm.ConnTypes)
	}
	for _, site := range []string{"*", "berlin"} {
		for _, im := range SiteLinkImports(site) {
			switch {
			case im.Service && strings.HasPrefix(im.Subject, "$JS.API.CONSUMER.RESET."),
				im.Service && strings.HasPrefix(im.Subject, "$JS.FC."),
				!im.Service && strings.HasPrefix(im.Subject, "fleet.sitecache."+site+"."):
			default:
				t.Errorf("a link account imports %+v", im)
			}
			if strings.HasSuffix(im.Subject, ">") {
				t.Errorf("a link account imports a full wildcard %+v", im)
			}
			if site == "berlin" && !strings.Contains(im.Subject, "berlin") {
				t.Errorf("berlin's link account imports %+v", im)
			}
		}
	}
	if SiteLinkAccountName("berlin") == SiteLinkAccountName("paris") {
		t.Error("two sites' link accounts share a name")
	}
}
