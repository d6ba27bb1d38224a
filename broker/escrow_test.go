package broker_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"fleet/admin"
	"fleet/agent"
	"fleet/broker"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

func escrowDevice(t *testing.T, c *broker.Coordinator, token, host, signer string, disks ...string) (*mdmDevice, map[string]string) {
	t.Helper()
	dir := t.TempDir()
	files := map[string]string{}
	for _, d := range disks {
		files[d] = filepath.Join(dir, "recovery-"+d)
		writeKey(t, files[d], host+"-"+d+"-key-1")
	}
	dev := runDevice(t, c, token, host, signer, func(o *agent.MDMOptions) {
		o.RecoveryKeys, o.EscrowPoll = files, 20*time.Millisecond
	})
	return dev, files
}

func writeKey(t *testing.T, path, key string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(key+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

func runAdmin(t *testing.T, c *broker.Coordinator, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	code := admin.Run(mdmCtx(t, time.Minute), append([]string{"--server", c.ClientURL(), "--creds", ownerCredsPath(c)}, args...), &out, &errb)
	return out.String(), errb.String(), code
}

func escrowList(t *testing.T, cl *admin.Client) []model.EscrowView {
	t.Helper()
	var out []model.EscrowView
	if err := cl.Call(context.Background(), subjects.VerbEscrow, false, nil, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// allEscrowed waits until n entries are escrowed to key.
func allEscrowed(t *testing.T, cl *admin.Client, n int, key string) {
	t.Helper()
	poll.Telling(t, 15*time.Second, "every disk escrowed", func() (bool, string) {
		vs := escrowList(t, cl)
		ok := len(vs) == n
		for _, v := range vs {
			ok = ok && v.State == "escrowed" && v.EscrowKey == key && !v.ConfirmedAt.IsZero()
		}
		return ok, mustJSONString(vs)
	})
}

func escrowPub(t *testing.T, out string) string {
	t.Helper()
	f := strings.Fields(out)
	if len(f) < 3 || f[0] != "escrow" || !strings.HasPrefix(f[2], "X") {
		t.Fatalf("escrow init said %q", out)
	}
	return f[2]
}

// Each LUKS device's recovery key is escrowed separately, sealed to the
// escrow key: the bucket never holds a key in plaintext, escrow get opens
// them with the key pair (audited), a regenerated key file is escrowed
// again, and after escrow rotate devices re-seal to the new pair.
func TestEscrowSealRegenerateRotate(t *testing.T) {
	c, owner, tok := mdmFleet(t, 2, "laptops")
	a, filesA := escrowDevice(t, c, tok, "esc-a", owner.Key(), "nvme0n1p2", "sda1")
	_, filesB := escrowDevice(t, c, tok, "esc-b", owner.Key(), "nvme0n1p2")

	keyFile := filepath.Join(t.TempDir(), "escrow.xk")
	out, errs, code := runAdmin(t, c, "escrow", "init", "--out", keyFile)
	if code != 0 {
		t.Fatalf("escrow init: %s", errs)
	}
	key1 := escrowPub(t, out)
	if fi, err := os.Stat(keyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("escrow key file: %v %v", fi, err)
	}
	allEscrowed(t, owner, 3, key1)

	for _, raw := range rawBucket(t, c, subjects.BucketEscrow) {
		for _, k := range []string{"esc-a-nvme0n1p2-key-1", "esc-a-sda1-key-1", "esc-b-nvme0n1p2-key-1"} {
			if bytes.Contains(raw, []byte(k)) {
				t.Fatalf("fleet_escrow holds recovery key %s in plaintext", k)
			}
		}
	}

	out, errs, code = runAdmin(t, c, "escrow", "get", "esc-a", "--key", keyFile)
	if code != 0 || !strings.Contains(out, "nvme0n1p2\tesc-a-nvme0n1p2-key-1") || !strings.Contains(out, "sda1\tesc-a-sda1-key-1") {
		t.Fatalf("escrow get: %d %q %s", code, out, errs)
	}
	recs := auditRecords(t, c)
	if last := recs[len(recs)-1]; last.Verb != subjects.VerbEscrowGet || last.Result != model.AuditOK {
		t.Errorf("escrow get not audited: %+v", last)
	}

	// A regenerated key is escrowed again.
	writeKey(t, filesB["nvme0n1p2"], "esc-b-nvme0n1p2-key-2")
	poll.Until(t, 15*time.Second, "new key escrowed", func() bool {
		out, _, code := runAdmin(t, c, "escrow", "get", "esc-b", "--key", keyFile)
		return code == 0 && strings.Contains(out, "esc-b-nvme0n1p2-key-2")
	})

	// Rotation: devices re-seal to the new pair; the old one no longer
	// opens what is escrowed now.
	keyFile2 := filepath.Join(t.TempDir(), "escrow2.xk")
	out, errs, code = runAdmin(t, c, "escrow", "rotate", "--out", keyFile2)
	if code != 0 {
		t.Fatalf("escrow rotate: %s", errs)
	}
	key2 := escrowPub(t, out)
	allEscrowed(t, owner, 3, key2)
	out, errs, code = runAdmin(t, c, "escrow", "get", "esc-a", "--key", keyFile2, "--disk", "sda1")
	if code != 0 || strings.TrimSpace(out) != "sda1\tesc-a-sda1-key-1" {
		t.Fatalf("escrow get with the new key: %d %q %s", code, out, errs)
	}
	_, errs, code = runAdmin(t, c, "escrow", "get", "esc-a", "--key", keyFile)
	if code == 0 || !strings.Contains(errs, "sealed to escrow key "+key2) {
		t.Fatalf("escrow get with the old key: %d %s", code, errs)
	}
	_ = filesA
	_ = a
}

// Device A cannot send escrow for B (the server refuses the subject), nor
// pass B's off under its own subject; a viewer cannot fetch escrowed keys.
func TestEscrowIsolation(t *testing.T) {
	c, owner, tok := mdmFleet(t, 2, "iso")
	keyFile := filepath.Join(t.TempDir(), "escrow.xk")
	out, errs, code := runAdmin(t, c, "escrow", "init", "--out", keyFile)
	if code != 0 {
		t.Fatalf("escrow init: %s", errs)
	}
	key := escrowPub(t, out)
	a, _ := escrowDevice(t, c, tok, "iso-a", owner.Key(), "sda1")
	b, _ := escrowDevice(t, c, tok, "iso-b", owner.Key(), "sda1")
	allEscrowed(t, owner, 2, key)
	before := len(rawBucket(t, c, subjects.BucketEscrow))

	nc, perms := rawDeviceConn(t, c, a.creds)
	put, err := model.SealRecoveryKey(a.creds.Key, "sda1", key, []byte("evil"), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	body := func(dev string, puts ...model.Signed) []byte {
		s, _ := model.Sign(a.creds.Key, model.PurposeEscrowSync, model.EscrowSync{Device: dev, Time: time.Now(), Puts: puts})
		b, _ := json.Marshal(s)
		return b
	}
	if _, err := nc.Request(subjects.EscrowPutFor(b.id), body(b.id, put), 2*time.Second); err == nil {
		t.Fatal("a's escrow for b was answered")
	}
	poll.Until(t, 5*time.Second, "permissions violation", func() bool { return perms.seen(subjects.EscrowPutFor(b.id)) })
	for name, data := range map[string][]byte{"request naming b": body(b.id, put)} {
		if r := deviceAsk[model.EscrowSyncReply](t, nc, subjects.EscrowPutFor(a.id), data); r.Error == "" {
			t.Errorf("%s: accepted", name)
		}
	}
	// A put of a's naming b inside a's own request.
	var p model.EscrowPut
	_ = put.Decode(&p)
	p.Device = b.id
	forB, _ := model.Sign(a.creds.Key, model.PurposeEscrow, p)
	r := deviceAsk[model.EscrowSyncReply](t, nc, subjects.EscrowPutFor(a.id), body(a.id, forB))
	if !strings.Contains(r.Error, "not its signer") {
		t.Errorf("a's put for b: %+v", r)
	}
	if after := len(rawBucket(t, c, subjects.BucketEscrow)); after != before {
		t.Errorf("refused escrow requests wrote %d entries", after-before)
	}
	viewer := addAdmin(t, c, subjects.RoleViewer, "v")
	err = viewer.Call(mdmCtx(t, 10*time.Second), subjects.VerbEscrowGet, true, model.EscrowGet{Ref: b.id}, nil)
	mdmWantErr(t, err, "may not call escrow-get")
}
