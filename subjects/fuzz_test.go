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
		DeviceFacts(id), DeviceEvents(id), DeviceDesired(id), DeviceCmd(id), DeviceAll(id),
		"", ".", "fleet.dev..facts", "fleet.dev." + id + ".", "fleet.dev.*.facts",
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
	})
}
