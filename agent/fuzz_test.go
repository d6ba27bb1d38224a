package agent

import (
	"testing"

	"github.com/nats-io/nats.go"
)

func FuzzParseLsblk(f *testing.F) {
	f.Add([]byte(lsblkLUKS))
	f.Add([]byte(`{"blockdevices":[{"name":"a","children":[{"name":"b","children":[]}]}]}`))
	f.Add([]byte(`{"blockdevices":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		enc, err := ParseLsblk(b)
		if err != nil && (enc.RootEncrypted != nil || len(enc.LUKSDevices) != 0) {
			t.Fatal("partial result with an error")
		}
	})
}

func FuzzParseMeminfo(f *testing.F) {
	f.Add([]byte("MemTotal: 100 kB\nMemAvailable: 50 kB\n"))
	f.Add([]byte("MemTotal:\nMemAvailable: 1\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		total, avail, err := ParseMeminfo(b)
		if err != nil && (total != 0 || avail != 0) {
			t.Fatal("values with an error")
		}
	})
}

func FuzzProcParsers(f *testing.F) {
	f.Add("0.5 0.2 0.1 1/2 3", "/dev/a / ext4 rw 0 0\n/dev/b /x\\040y xfs rw 0 0")
	f.Fuzz(func(t *testing.T, s, mounts string) {
		_, _ = ParseLoadavg(s)
		_, _ = ParseUptime(s)
		_ = ParseOSRelease([]byte(s))
		for _, m := range ParseMounts([]byte(mounts)) {
			if m.Path == "" {
				t.Fatal("empty mount path")
			}
		}
	})
}

func FuzzParseDesired(f *testing.F) {
	f.Add("", "", "", []byte(`{"device":"U","release_id":"r","store_path":"/nix/store/x","release":{"payload":{},"signer":"U","sig":"x"}}`))
	f.Add("404", "", "", []byte(nil))
	f.Add("", "DEL", "5", []byte(nil))
	f.Add("", "", "x", []byte("{"))
	f.Fuzz(func(t *testing.T, status, op, seq string, body []byte) {
		h := nats.Header{}
		if status != "" {
			h.Set("Status", status)
		}
		if op != "" {
			h.Set("KV-Operation", op)
		}
		if seq != "" {
			h.Set(nats.JSSequence, seq)
		}
		m, err := ParseDesired(h, body)
		if err != nil {
			return
		}
		if m.Desired != nil {
			// Whatever arrives must go through Resolve without panicking,
			// and an empty signer list refuses it.
			if _, _, err := m.Desired.Resolve("host", []string{}); err == nil {
				t.Fatal("resolved without trusted signers")
			}
		}
		_ = m.Key()
	})
}
