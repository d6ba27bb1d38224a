package subjects

import (
	"strings"
	"testing"
)

// FuzzDeviceFromSubject checks that DeviceFromSubject never panics and only
// accepts fleet.dev.<valid device ID>.<one plain token>.
func FuzzDeviceFromSubject(f *testing.F) {
	id := newDevice(f)
	for _, s := range []string{
		DeviceFacts(id), DeviceEvents(id), DeviceDesired(id), DesiredGetFor(id),
		DeviceCmd(DefaultSite, id), DeviceNotify("berlin", id),
		"", ".", "fleet.dev..facts", "fleet.dev." + id + ".", "fleet.dev.*.facts", "fleet.dev." + id + ".>",
		"fleet.dev." + id + ".facts.x", "fleet.dev." + strings.ToLower(id) + ".facts",
		"fleet.dev.invalid.facts", "\xff\xfe", "fleet.dev.U\x00.facts",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, ok := DeviceFromSubject(s)
		if !ok {
			if got != "" {
				t.Fatalf("DeviceFromSubject(%q) = %q with ok=false", s, got)
			}
			return
		}
		if !ValidDeviceID(got) {
			t.Fatalf("DeviceFromSubject(%q) returned invalid device ID %q", s, got)
		}
		leaf, found := strings.CutPrefix(s, "fleet.dev."+got+".")
		if !found || leaf == "" || strings.ContainsAny(leaf, ".*> \t\r\n") {
			t.Fatalf("DeviceFromSubject(%q) accepted a subject that is not fleet.dev.<id>.<token>", s)
		}
		if _, _, ok := DeviceInboxOf(s); ok {
			t.Fatalf("%q is both a device subject and a device inbox", s)
		}
	})
}

// FuzzInboxes feeds reply subjects to the checks responders make before
// they answer. None may panic; whatever is taken for an inbox lies under
// the prefix of the key (and site) it names, so an answer only reaches the
// one who asked; no subject is both an admin's and a device's inbox; and
// every inbox the builders make is read back as its own.
func FuzzInboxes(f *testing.F) {
	id := newDevice(f)
	for _, c := range [][3]string{
		{DeviceInboxPrefix(DefaultSite, id) + ".r", DefaultSite, "r"},
		{DeviceNotify("berlin", id), "berlin", "x.y"},
		{DeviceCmd("site-2", id), "-x", ""},
		{InboxPrefix(id) + ".abc", "Berlin", "*"},
		{InboxPrefix(id), "a.b", ">"},
		{InboxPrefix(id) + ".", "", "."},
		{DeviceInboxPrefix(DefaultSite, id), "hub", "r."},
		{"_INBOX_DEV." + id + ".r.s", "h b", "\x00"},
		{"_INBOX_DEV..." + id, "\xff", "r"},
		{"_INBOX_DEV.hub." + strings.ToLower(id) + ".r", strings.Repeat("a", 64), "r"},
		{"_INBOX_" + id[:55] + ".r", "a", "r"},
		{"_INBOX." + id + ".r", "0", "r"},
		{DeviceFacts(id), "x", "r"},
		{"", "", ""},
	} {
		f.Add(c[0], c[1], c[2])
	}
	f.Fuzz(func(t *testing.T, reply, site, tail string) {
		dsite, dkey, dok := DeviceInboxOf(reply)
		if dok {
			if !ValidSite(dsite) || !ValidDeviceID(dkey) {
				t.Fatalf("DeviceInboxOf(%q) = %q, %q: not a site and a key", reply, dsite, dkey)
			}
			if !InInbox(reply, DeviceInboxPrefix(dsite, dkey)) {
				t.Fatalf("DeviceInboxOf(%q) = %q, %q, but the reply is not in that inbox", reply, dsite, dkey)
			}
		} else if dsite != "" || dkey != "" {
			t.Fatalf("DeviceInboxOf(%q) = %q, %q with ok=false", reply, dsite, dkey)
		}
		akey, aok := AdminInboxKey(reply)
		if aok {
			if !ValidDeviceID(akey) || !InInbox(reply, InboxPrefix(akey)) {
				t.Fatalf("AdminInboxKey(%q) = %q, but the reply is not in that inbox", reply, akey)
			}
		} else if akey != "" {
			t.Fatalf("AdminInboxKey(%q) = %q with ok=false", reply, akey)
		}
		if dok && aok {
			t.Fatalf("%q is both a device inbox (%s) and an admin inbox (%s)", reply, dkey, akey)
		}
		if _, ok := DeviceFromSubject(reply); ok && (dok || aok) {
			t.Fatalf("%q is both a device subject and an inbox", reply)
		}

		// InInbox is "under prefix, with a tail": nothing else.
		want := strings.HasPrefix(reply, tail+".") && len(reply) > len(tail)+1
		if got := InInbox(reply, tail); got != want {
			t.Fatalf("InInbox(%q, %q) = %v", reply, tail, got)
		}

		// Round trip: an inbox the builders make is read back as its own,
		// and lies in no other site's or key's inbox.
		if !ValidSite(site) || tail == "" {
			return
		}
		r := DeviceInboxPrefix(site, id) + "." + tail
		if s, k, ok := DeviceInboxOf(r); !ok || s != site || k != id {
			t.Fatalf("DeviceInboxOf(%q) = %q, %q, %v; want %q, %q", r, s, k, ok, site, id)
		}
		if !InInbox(r, DeviceInboxPrefix(site, id)) {
			t.Fatalf("%q is not in its own inbox", r)
		}
		if site != DefaultSite && InInbox(r, DeviceInboxPrefix(DefaultSite, id)) {
			t.Fatalf("%q is in the hub's inbox of the same key", r)
		}
		if _, ok := AdminInboxKey(r); ok {
			t.Fatalf("device inbox %q taken for an admin inbox", r)
		}
		a := InboxPrefix(id) + "." + tail
		if k, ok := AdminInboxKey(a); !ok || k != id {
			t.Fatalf("AdminInboxKey(%q) = %q, %v; want %q", a, k, ok, id)
		}
		if _, _, ok := DeviceInboxOf(a); ok {
			t.Fatalf("admin inbox %q taken for a device inbox", a)
		}
	})
}
