package agent

import (
	"encoding/json"
	"testing"
	"time"
	"unicode/utf8"

	"fleet/model"
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
	desired := `{"device":"U","release_id":"r","store_path":"/nix/store/x","release":{"payload":{},"signer":"U","sig":"x"}}`
	f.Add([]byte(`{"seq":3,"desired":`+desired+`}`), uint64(3), "r", "/nix/store/x", int64(5), "")
	f.Add([]byte(`{"seq":5}`), uint64(0), "", "", int64(0), "")
	f.Add([]byte(`{"error":"no"}`), uint64(1), "r", "p", int64(-1), "kv down")
	f.Add([]byte(`{"seq":7,"desired":"x"}`), uint64(1<<63), "\xff", "", int64(1)<<62, "")
	f.Add([]byte("{"), uint64(0), "", "", int64(0), "")
	f.Fuzz(func(t *testing.T, raw []byte, seq uint64, releaseID, storePath string, issuedNS int64, errMsg string) {
		// Whatever arrives: no panic, and one coherent answer.
		m, err := ParseDesired(raw)
		if err != nil {
			if m.Absent || m.Desired != nil || m.Err != nil || m.Seq != 0 {
				t.Fatalf("partial result with an error: %+v", m)
			}
		} else {
			set := 0
			for _, b := range []bool{m.Absent, m.Desired != nil, m.Err != nil} {
				if b {
					set++
				}
			}
			if set != 1 {
				t.Fatalf("not exactly one of absent, desired, err: %+v", m)
			}
			if m.Desired != nil {
				// Whatever arrives must go through Resolve without
				// panicking, and an empty signer list refuses it.
				if _, _, err := m.Desired.Resolve("host", []string{}); err == nil {
					t.Fatal("resolved without trusted signers")
				}
			}
			_ = m.Key()
		}

		// A reply the coordinator encodes comes back as it was sent.
		d := model.Desired{ReleaseID: releaseID, StorePath: storePath, IssuedAt: time.Unix(0, issuedNS).UTC()}
		body, err := json.Marshal(d)
		if err != nil {
			t.Fatal(err)
		}
		data, err := json.Marshal(model.DesiredReply{Seq: seq, Desired: body, Error: errMsg})
		if err != nil {
			t.Fatal(err)
		}
		m, err = ParseDesired(data)
		if errMsg != "" {
			if err == nil {
				t.Fatalf("coordinator error %q not returned: %+v", errMsg, m)
			}
			return
		}
		if err != nil || m.Desired == nil || m.Err != nil || m.Absent || m.Seq != seq || !m.Desired.IssuedAt.Equal(d.IssuedAt) {
			t.Fatalf("round trip of %s: %+v %v", data, m, err)
		}
		// JSON replaces invalid UTF-8; valid strings come back as they were.
		if utf8.ValidString(releaseID) && m.Desired.ReleaseID != releaseID || utf8.ValidString(storePath) && m.Desired.StorePath != storePath {
			t.Fatalf("round trip of %s: %+v", data, m.Desired)
		}
		// No value: absent, with its revision.
		data, _ = json.Marshal(model.DesiredReply{Seq: seq})
		if m, err := ParseDesired(data); err != nil || !m.Absent || m.Seq != seq {
			t.Fatalf("no value, seq %d: %+v %v", seq, m, err)
		}
	})
}
