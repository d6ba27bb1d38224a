package subjects

import (
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
		{"DeviceCmd", DeviceCmd(id), "fleet.dev." + id + ".cmd"},
		{"DeviceAll", DeviceAll(id), "fleet.dev." + id + ".>"},
		{"APIReadVerb", APIReadVerb("devices"), "fleet.api.read.devices"},
		{"APIWriteVerb", APIWriteVerb("deploy"), "fleet.api.write.deploy"},
		{"AuditSubject", AuditSubject("deploy"), "fleet.audit.deploy"},
		{"InboxPrefix", InboxPrefix(id), "_INBOX_" + id},
		{"JSAPIPrefix", JSAPIPrefix("fleet"), "$JS.fleet.API"},
		{"JSAPIPrefix local", JSAPIPrefix(""), "$JS.API"},
		{"DesiredDirectGet local", DesiredDirectGet("", id), "$JS.API.DIRECT.GET.KV_fleet_desired.$KV.fleet_desired." + id},
		{"KVStream", KVStream(BucketDesired), "KV_fleet_desired"},
		{"KVKey", KVKey(BucketDesired, id), "$KV.fleet_desired." + id},
		{"DirectGetLast", DirectGetLast("site", StreamFacts, DeviceFacts(id)),
			"$JS.site.API.DIRECT.GET.FLEET_FACTS.fleet.dev." + id + ".facts"},
		{"DesiredDirectGet", DesiredDirectGet("fleet", id),
			"$JS.fleet.API.DIRECT.GET.KV_fleet_desired.$KV.fleet_desired." + id},
		{"DesiredRepublishSource", DesiredRepublishSource, "$KV.fleet_desired.*"},
		{"DesiredRepublishDest", DesiredRepublishDest, "fleet.dev.{{wildcard(1)}}.desired"},
		{"AllFacts", AllFacts, "fleet.dev.*.facts"},
		{"AllEvents", AllEvents, "fleet.dev.*.events"},
		{"AllDesired", AllDesired, "fleet.dev.*.desired"},
		{"AllAudit", AllAudit, "fleet.audit.>"},
		{"AllDevices", AllDevices, "fleet.dev.>"},
	}
	for _, c := range cases {
		if c.got != c.want {
			t.Errorf("%s = %q, want %q", c.name, c.got, c.want)
		}
	}
	// Every built per-device subject is matched by its stream's filter and
	// by the device's own wildcard, and by no other device's.
	other := newDevice(t)
	for filter, subj := range map[string]string{
		AllFacts: DeviceFacts(id), AllEvents: DeviceEvents(id), AllDesired: DeviceDesired(id),
	} {
		if !server.SubjectMatchesFilter(subj, filter) {
			t.Errorf("%s does not match stream filter %s", subj, filter)
		}
		if !server.SubjectMatchesFilter(subj, DeviceAll(id)) {
			t.Errorf("%s does not match %s", subj, DeviceAll(id))
		}
		if server.SubjectMatchesFilter(subj, DeviceAll(other)) {
			t.Errorf("%s matches another device's %s", subj, DeviceAll(other))
		}
	}
	// The RePublish destination maps a key's subject to the device subject.
	if got := strings.Replace(DesiredRepublishDest, "{{wildcard(1)}}", id, 1); got != DeviceDesired(id) {
		t.Errorf("republish of %s goes to %s, want %s", KVKey(BucketDesired, id), got, DeviceDesired(id))
	}
}

// A device ID that is not a single plain token must never widen a subject.
func TestBuildersRefuseWildcardIDs(t *testing.T) {
	for _, id := range []string{"", "*", ">", "a.b", "U*", "a b", "a\tb", "a\nb", "a\r"} {
		for name, got := range map[string]string{
			"DeviceDesired": DeviceDesired(id),
			"DeviceFacts":   DeviceFacts(id),
			"DeviceEvents":  DeviceEvents(id),
			"DeviceCmd":     DeviceCmd(id),
			"DeviceAll":     DeviceAll(id),
		} {
			if !strings.HasPrefix(got, "fleet.dev.invalid.") {
				t.Errorf("%s(%q) = %q, want the fleet.dev.invalid. guard", name, id, got)
			}
			if strings.Count(got, ".") != 3 {
				t.Errorf("%s(%q) = %q has more than four tokens", name, id, got)
			}
		}
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
	for _, s := range []string{DeviceFacts(id), DeviceEvents(id), DeviceDesired(id), DeviceCmd(id)} {
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
	} {
		if got, ok := DeviceFromSubject(s); ok {
			t.Errorf("DeviceFromSubject(%q) = %q, true; want false", s, got)
		}
	}
}

func TestParseRole(t *testing.T) {
	for _, r := range Roles {
		got, err := ParseRole(string(r))
		if err != nil || got != r {
			t.Errorf("ParseRole(%q) = %q, %v", r, got, err)
		}
	}
	for _, s := range []string{"", "Owner", "admin", "owner "} {
		if _, err := ParseRole(s); err == nil {
			t.Errorf("ParseRole(%q) succeeded", s)
		}
	}
	for _, r := range AdminRoles {
		if RoleTemplate(r, Domain).Bearer {
			t.Errorf("admin role %s must not be a bearer role", r)
		}
	}
}

// expand fills in a template the way the server does for user pub.
func expand(filters []string, pub string) []string {
	out := make([]string, len(filters))
	for i, f := range filters {
		out[i] = strings.ReplaceAll(f, "{{subject()}}", pub)
	}
	return out
}

func collides(filters []string, subj string) (string, bool) {
	for _, f := range filters {
		if server.SubjectsCollide(f, subj) {
			return f, true
		}
	}
	return "", false
}

func TestRoleTemplatesNeverShareInboxes(t *testing.T) {
	user := newDevice(t)
	for _, d := range []string{Domain, "site_1"} {
		for _, r := range Roles {
			tpl := RoleTemplate(r, d)
			if len(tpl.Pub) == 0 || len(tpl.Sub) == 0 {
				t.Errorf("role %s: empty template %+v", r, tpl)
			}
			for _, f := range append(slicesConcat(tpl.Pub, tpl.Sub), expand(tpl.Sub, user)...) {
				if !server.IsValidSubject(strings.ReplaceAll(f, "{{subject()}}", user)) {
					t.Errorf("role %s: %q is not a valid subject filter", r, f)
				}
			}
			sub := expand(tpl.Sub, user)
			if r == RoleLeaf {
				// The leaf link carries device traffic only, on a leaf node
				// connection: never admin replies, enrollment requests (they
				// carry token secrets), the API or JetStream's API.
				if len(tpl.ConnTypes) != 1 || tpl.ConnTypes[0] != "LEAFNODE" {
					t.Errorf("leaf role must be bound to LEAFNODE connections, got %v", tpl.ConnTypes)
				}
				for _, bad := range []string{InboxPrefix(newDevice(t)) + ".x", "_INBOX.x", Enroll, APIReadVerb("devices"),
					APIWriteVerb("deploy"), AuditSubject("x"), "$JS.API.STREAM.INFO.x", "$SYS.x", KVKey(BucketTokens, "x")} {
					if f, ok := collides(sub, bad); ok {
						t.Errorf("leaf (domain %s) receives %q through %q", d, bad, f)
					}
				}
				pub := expand(tpl.Pub, user)
				for _, bad := range []string{APIReadVerb("devices"), APIWriteVerb("deploy"), AuditSubject("x"),
					JSAPIPrefix(d) + ".STREAM.DELETE." + StreamAudit, JSAPIPrefix("") + ".STREAM.INFO." + KVStream(BucketAdmins),
					KVKey(BucketAdmins, "x"), "$SYS.REQ.CLAIMS.UPDATE"} {
					if f, ok := collides(pub, bad); ok {
						t.Errorf("leaf (domain %s) may send %q through %q", d, bad, f)
					}
				}
				for _, good := range []string{DeviceFacts(user), Enroll, DesiredDirectGet(d, user), "_INBOX.r"} {
					if _, ok := collides(pub, good); !ok {
						t.Errorf("leaf (domain %s) may not send %q", d, good)
					}
				}
				for _, good := range []string{DeviceDesired(user), DeviceInboxPrefix(user) + ".r"} {
					if _, ok := collides(sub, good); !ok {
						t.Errorf("leaf (domain %s) does not receive %q", d, good)
					}
				}
				continue
			}
			if len(tpl.ConnTypes) != 0 {
				t.Errorf("role %s: unexpected connection types %v", r, tpl.ConnTypes)
			}
			for _, bad := range []string{"_INBOX.x", "_INBOX.x.y", "_INBOX_" + newDevice(t) + ".x", "$SYS.x"} {
				if f, ok := collides(sub, bad); ok {
					t.Errorf("role %s (domain %s) may subscribe %q through %q", r, d, bad, f)
				}
			}
			for _, f := range tpl.Sub {
				if f == ">" || f == "_INBOX.>" || strings.HasPrefix(f, "*") {
					t.Errorf("role %s: subscribe filter %q is too wide", r, f)
				}
			}
			// Every role may read its own replies, through its own prefix.
			want := InboxPrefixFor(r, user) + ".>"
			found := false
			for _, f := range sub {
				found = found || f == want
			}
			if !found {
				t.Errorf("role %s: subscribe %v lacks its own inbox %s", r, sub, want)
			}
		}
	}
}

func slicesConcat(a, b []string) []string {
	return append(append([]string{}, a...), b...)
}

// The agent template, filled in for device A, touches only A's subjects.
func TestAgentTemplateIsolatesDevices(t *testing.T) {
	a, b := newDevice(t), newDevice(t)
	tpl := RoleTemplate(RoleAgent, Domain)
	pub, sub := expand(tpl.Pub, a), expand(tpl.Sub, a)
	for _, s := range []string{DeviceFacts(a), DeviceEvents(a), DesiredDirectGet(Domain, a), DesiredDirectGet("", a)} {
		if _, ok := collides(pub, s); !ok {
			t.Errorf("agent %s may not publish %s", a, s)
		}
	}
	for _, s := range []string{DeviceDesired(a), DeviceCmd(a), DeviceInboxPrefix(a) + ".r"} {
		if _, ok := collides(sub, s); !ok {
			t.Errorf("agent %s may not subscribe %s", a, s)
		}
	}
	for _, s := range []string{
		DeviceFacts(b), DeviceEvents(b), DesiredDirectGet(Domain, b), Enroll,
		APIReadVerb("devices"), APIWriteVerb("deploy"), AuditSubject("x"),
		JSAPIPrefix(Domain) + ".STREAM.INFO." + StreamFacts,
		DesiredDirectGet("", b), DesiredDirectGet("other", a),
		DirectGetLast(Domain, KVStream(BucketDevices), KVKey(BucketDevices, a)),
		DirectGetLast("", KVStream(BucketDevices), KVKey(BucketDevices, a)),
		"$JS.API.STREAM.INFO." + KVStream(BucketDesired),
	} {
		if f, ok := collides(pub, s); ok {
			t.Errorf("agent %s may publish %s through %s", a, s, f)
		}
	}
	for _, s := range []string{DeviceDesired(b), DeviceCmd(b), DeviceInboxPrefix(b) + ".r", InboxPrefix(b) + ".r", "fleet.enroll"} {
		if f, ok := collides(sub, s); ok {
			t.Errorf("agent %s may subscribe %s through %s", a, s, f)
		}
	}
	if !tpl.Responses {
		t.Error("agent must be allowed to answer commands")
	}
	if tpl.Bearer {
		t.Error("agent must prove its key")
	}
}

func TestAdminTemplates(t *testing.T) {
	u := newDevice(t)
	dev := newDevice(t)
	type check struct {
		subj string
		pub  bool
	}
	cases := map[Role][]check{
		RoleEnroll: {
			{Enroll, true}, {APIReadVerb("devices"), false}, {DeviceFacts(dev), false},
			{JSAPIPrefix(Domain) + ".STREAM.INFO." + StreamFacts, false},
		},
		RoleViewer: {
			// Write verbs reach the coordinator, which refuses and audits them.
			{APIReadVerb("devices"), true}, {APIWriteVerb("deploy"), true}, {Enroll, false},
			{JSAPIPrefix(Domain) + ".STREAM.INFO." + StreamFacts, true},
			{DirectGetLast(Domain, StreamEvents, DeviceEvents(dev)), true},
			{JSAPIPrefix(Domain) + ".STREAM.INFO." + StreamAudit, false},
			{JSAPIPrefix(Domain) + ".STREAM.DELETE." + StreamFacts, false},
			{DesiredDirectGet(Domain, dev), false}, {DeviceFacts(dev), false},
		},
		RoleOperator: {
			{APIReadVerb("devices"), true}, {APIWriteVerb("deploy"), true},
			{DeviceCmd(dev), false}, {JSAPIPrefix(Domain) + ".STREAM.DELETE." + StreamFacts, false},
		},
		RoleObserver: {
			{APIReadVerb("devices"), true}, {APIReadVerb("facts"), true},
			{JSAPIPrefix(Domain) + ".STREAM.INFO." + StreamFacts, true},
			{JSAPIPrefix(Domain) + ".STREAM.INFO." + StreamEvents, false},
			{APIReadVerb("tokens"), false}, {APIWriteVerb("deploy"), false},
		},
		RoleOwner: {
			{APIWriteVerb("tokens"), true}, {DeviceCmd(dev), true}, {Enroll, true},
		},
	}
	for r, checks := range cases {
		pub := expand(RoleTemplate(r, Domain).Pub, u)
		for _, c := range checks {
			// A JetStream API subject must be allowed or refused alike in
			// its domain form and in the local form the hub checks.
			forms := []string{c.subj}
			if rest, ok := strings.CutPrefix(c.subj, JSAPIPrefix(Domain)); ok {
				forms = append(forms, JSAPIPrefix("")+rest)
			}
			for _, s := range forms {
				if _, ok := collides(pub, s); ok != c.pub {
					t.Errorf("role %s publish %s: allowed=%v, want %v", r, s, ok, c.pub)
				}
			}
		}
	}
	if !RoleTemplate(RoleEnroll, Domain).Bearer {
		t.Error("enroll must be a bearer role")
	}
	if got := RoleTemplate("nope", Domain); len(got.Pub)+len(got.Sub) != 0 {
		t.Errorf("unknown role got a template: %+v", got)
	}
}

// A site's system link learns account updates and reports presence; it can
// neither push account JWTs, nor reach server requests, nor read anyone's
// replies but the leaf's own lookups.
func TestSiteSystemTemplate(t *testing.T) {
	tpl := SiteSystemTemplate()
	if len(tpl.ConnTypes) != 1 || tpl.ConnTypes[0] != "LEAFNODE" {
		t.Fatalf("site system link must be a leaf node connection, got %v", tpl.ConnTypes)
	}
	for _, bad := range []string{ClaimsUpdate, AccountClaimsUpdate("ACC"), "$SYS.REQ.SERVER.PING", "$SYS.REQ.SERVER.X.KICK",
		"$SYS.REQ.ACCOUNT.ACC.CONNZ", Enroll, APIWriteVerb("deploy")} {
		if f, ok := collides(tpl.Pub, bad); ok {
			t.Errorf("a site may send %q through %q", bad, f)
		}
	}
	for _, bad := range []string{"_INBOX.x", InboxPrefix("UA") + ".x", "$SYS.REQ.SERVER.PING", Enroll} {
		if f, ok := collides(tpl.Sub, bad); ok {
			t.Errorf("a site receives %q through %q", bad, f)
		}
	}
	for _, good := range []string{AccountClaimsUpdate("ACC"), "$SYS.ACCOUNT.ACC.CLAIMS.UPDATE"} {
		if _, ok := collides(tpl.Sub, good); !ok {
			t.Errorf("a site does not hear %q", good)
		}
	}
	for _, good := range []string{"$SYS.REQ.ACCOUNT.ACC.CLAIMS.LOOKUP", "$SYS.ACCOUNT.ACC.CONNECT", "$SYS.ACCOUNT.ACC.DISCONNECT"} {
		if _, ok := collides(tpl.Pub, good); !ok {
			t.Errorf("a site may not send %q", good)
		}
	}
}
