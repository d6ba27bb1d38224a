package broker_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"fleet/internal/poll"
	"fleet/internal/promvalue"
	"fleet/model"
	"fleet/subjects"
)

// status --unencrypted lists the devices whose root is not encrypted (or
// not known to be), --expiring the payload certificates that expire
// within the window; the metrics say the same; escrow ls names LUKS
// devices with nothing escrowed.
func TestEncryptionStatusExpiringAndMetrics(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	tok := createToken(t, owner, 3, false, "fleet")
	yes, no := true, false
	encd := runDeviceEnc(t, c, tok.Token, "enc-yes", owner.Key(), &model.Encryption{RootEncrypted: &yes, LUKSDevices: []string{"nvme0n1p2"}}, nil)
	plain := runDeviceEnc(t, c, tok.Token, "enc-no", owner.Key(), &model.Encryption{RootEncrypted: &no}, nil)
	unknown := runDeviceEnc(t, c, tok.Token, "enc-unknown", owner.Key(), nil, nil)
	ctx := mdmCtx(t, time.Minute)

	poll.Telling(t, 15*time.Second, "facts of every device", func() (bool, string) {
		var vs []model.EncryptionView
		if err := owner.Call(ctx, subjects.VerbEncryption, false, nil, &vs); err != nil {
			return false, err.Error()
		}
		n := 0
		for _, v := range vs {
			if !v.FactsAt.IsZero() {
				n++
			}
		}
		return n == 3, mustJSONString(vs)
	})
	out, errs, code := runAdmin(t, c, "--json", "status", "--unencrypted")
	if code != 0 {
		t.Fatalf("status --unencrypted: %s", errs)
	}
	var rep struct {
		Unencrypted []model.EncryptionView `json:"unencrypted"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, v := range rep.Unencrypted {
		got[v.Device] = true
	}
	if len(got) != 2 || !got[plain.id] || !got[unknown.id] || got[encd.id] {
		t.Errorf("unencrypted: %s", out)
	}
	reg := c.Metrics()
	for state, want := range map[string]float64{"encrypted": 1, "unencrypted": 1, "unknown": 1} {
		if v, ok, err := promvalue.Get(reg, "fleet_devices_encryption", map[string]string{"state": state}); err != nil || !ok || v != want {
			t.Errorf("fleet_devices_encryption{state=%s} = %v (%v, %v), want %v", state, v, ok, err, want)
		}
	}
	if v, ok, _ := promvalue.Get(reg, "fleet_device_root_encrypted", map[string]string{"name": "enc-no"}); !ok || v != 0 {
		t.Errorf("fleet_device_root_encrypted{name=enc-no} = %v, %v", v, ok)
	}

	// Certificates: one expires in 10 days, one in 60.
	soon, later := time.Now().Add(10*24*time.Hour).Truncate(time.Second), time.Now().Add(60*24*time.Hour).Truncate(time.Second)
	for dev, exp := range map[string]time.Time{"enc-yes": soon, "enc-no": later} {
		f := filepath.Join(t.TempDir(), "cert.pem")
		if err := os.WriteFile(f, testCert(t, exp), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, errs, code := runAdmin(t, c, "payload", "push", "--device", dev, "--name", "vpn-cert", "--file", f); code != 0 {
			t.Fatalf("payload push: %s", errs)
		}
	}
	out, errs, code = runAdmin(t, c, "--json", "status", "--expiring", "30d")
	if code != 0 {
		t.Fatalf("status --expiring: %s", errs)
	}
	var exp struct {
		Expiring []model.PayloadView `json:"expiring"`
	}
	_ = json.Unmarshal([]byte(out), &exp)
	if len(exp.Expiring) != 1 || exp.Expiring[0].Device != encd.id || !exp.Expiring[0].NotAfter.Equal(soon) {
		t.Errorf("expiring within 30d: %s", out)
	}
	if v, ok, _ := promvalue.Get(reg, "fleet_payload_cert_expiry_timestamp_seconds", map[string]string{"name": "enc-no", "payload": "vpn-cert"}); !ok || v != float64(later.Unix()) {
		t.Errorf("cert expiry metric = %v, %v; want %d", v, ok, later.Unix())
	}
	if _, errs, code := runAdmin(t, c, "status", "--expiring", "soon"); code == 0 || errs == "" {
		t.Errorf("--expiring soon accepted")
	}

	// enc-yes has a LUKS device and nothing escrowed.
	vs := escrowList(t, owner)
	if len(vs) != 1 || vs[0].Device != encd.id || vs[0].Disk != "nvme0n1p2" || vs[0].State != "missing" {
		t.Errorf("escrow ls: %s", mustJSONString(vs))
	}
}
