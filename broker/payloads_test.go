package broker_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"fleet/accounts"
	"fleet/admin"
	"fleet/agent"
	"fleet/broker"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// testCert is a PEM certificate that expires at notAfter.
func testCert(t *testing.T, notAfter time.Time) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "wifi"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func payloadDevice(t *testing.T, c *broker.Coordinator, token, host, signer string) (*mdmDevice, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "payloads")
	d := runDevice(t, c, token, host, signer, func(o *agent.MDMOptions) { o.PayloadDir = dir })
	return d, dir
}

func payloadsOf(t *testing.T, cl *admin.Client, name string) []model.PayloadView {
	t.Helper()
	var out []model.PayloadView
	if err := cl.Call(context.Background(), subjects.VerbPayloads, false, model.PayloadQuery{Name: name}, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func viewOf(vs []model.PayloadView, dev string) *model.PayloadView {
	for i := range vs {
		if vs[i].Device == dev {
			return &vs[i]
		}
	}
	return nil
}

// An agent receives its payload: the file appears with the requested mode,
// its unit is reloaded, payload ls shows it delivered with the
// certificate's expiry; the coordinator's stored bytes never hold the
// plaintext; a withdrawn payload disappears from the device only.
func TestPayloadDeliveredAndWithdrawn(t *testing.T) {
	c, owner, tok := mdmFleet(t, 2, "wifi")
	a, dirA := payloadDevice(t, c, tok, "pl-a", owner.Key())
	b, dirB := payloadDevice(t, c, tok, "pl-b", owner.Key())
	ctx := mdmCtx(t, time.Minute)

	expiry := time.Now().Add(20 * 24 * time.Hour).Truncate(time.Second)
	cert := testCert(t, expiry)
	certFile := filepath.Join(t.TempDir(), "cert.pem")
	if err := os.WriteFile(certFile, cert, 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	code := admin.Run(ctx, []string{"--server", c.ClientURL(), "--creds", ownerCredsPath(c), "payload", "push", "--group", "wifi",
		"--name", "wifi-cert", "--file", certFile, "--mode", "0440", "--reload", "wpa_supplicant.service"}, &out, &errb)
	if code != 0 {
		t.Fatalf("payload push: %d\n%s%s", code, out.String(), errb.String())
	}
	for _, dir := range []string{dirA, dirB} {
		p := filepath.Join(dir, "wifi-cert")
		poll.Until(t, 10*time.Second, "payload at "+p, func() bool {
			got, err := os.ReadFile(p)
			return err == nil && bytes.Equal(got, cert)
		})
		fi, err := os.Stat(p)
		if err != nil || fi.Mode().Perm() != 0o440 {
			t.Errorf("%s: mode %v, %v; want 0440", p, fi.Mode(), err)
		}
	}
	for _, d := range []*mdmDevice{a, b} {
		poll.Until(t, 10*time.Second, "unit reloaded", func() bool { return slices.Equal(d.actions.reloaded(), []string{"wpa_supplicant.service"}) })
	}
	poll.Telling(t, 10*time.Second, "payload ls shows both delivered", func() (bool, string) {
		vs := payloadsOf(t, owner, "wifi-cert")
		ok := len(vs) == 2
		for _, v := range vs {
			ok = ok && v.State == "delivered" && v.NotAfter.Equal(expiry) && v.Mode == 0o440
		}
		return ok, mustJSONString(vs)
	})

	// The stored bytes are sealed: neither the plaintext nor its base64.
	for _, raw := range rawBucket(t, c, subjects.BucketPayloads) {
		if bytes.Contains(raw, cert) || bytes.Contains(raw, []byte(base64.StdEncoding.EncodeToString(cert)[:40])) || bytes.Contains(raw, []byte("BEGIN CERTIFICATE")) {
			t.Fatalf("fleet_payloads holds the plaintext: %.200s", raw)
		}
	}

	// Withdrawn from a only.
	code = admin.Run(ctx, []string{"--server", c.ClientURL(), "--creds", ownerCredsPath(c), "payload", "rm", "wifi-cert", "--device", "pl-a"}, &out, &errb)
	if code != 0 {
		t.Fatalf("payload rm: %d\n%s", code, errb.String())
	}
	poll.Until(t, 10*time.Second, "withdrawn payload gone", func() bool {
		_, err := os.Stat(filepath.Join(dirA, "wifi-cert"))
		return errors.Is(err, os.ErrNotExist)
	})
	if got, err := os.ReadFile(filepath.Join(dirB, "wifi-cert")); err != nil || !bytes.Equal(got, cert) {
		t.Errorf("b's payload after a's withdrawal: %v", err)
	}
	if vs := payloadsOf(t, owner, "wifi-cert"); len(vs) != 1 || vs[0].Device != b.id {
		t.Errorf("payload ls after rm: %+v", vs)
	}
	// Purged: not even a sealed revision of a's stays.
	for _, raw := range rawBucket(t, c, subjects.BucketPayloads) {
		if bytes.Contains(raw, []byte(`"device":"`+a.id+`"`)) {
			t.Errorf("a's withdrawn payload is still stored")
		}
	}
}

func mustJSONString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// Device A cannot ask for B's payloads (the server refuses the subject),
// cannot pass a request for B off as its own, and cannot open a payload
// sealed to B.
func TestPayloadIsolation(t *testing.T) {
	c, owner, tok := mdmFleet(t, 2, "iso")
	a, _ := payloadDevice(t, c, tok, "iso-a", owner.Key())
	b, dirB := payloadDevice(t, c, tok, "iso-b", owner.Key())
	ctx := mdmCtx(t, time.Minute)
	secret := []byte("psk=correct horse battery staple")
	devB, err := owner.Device(ctx, b.id)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := owner.PushPayload(ctx, []model.DeviceView{*devB}, model.Payload{Name: "psk"}, secret); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, "b has its payload", func() bool {
		got, _ := os.ReadFile(filepath.Join(dirB, "psk"))
		return bytes.Equal(got, secret)
	})

	// A's own connection, as the agent makes it.
	nc, perms := rawDeviceConn(t, c, a.creds)
	body := signedSync(t, a.creds.Key, b.id)
	_, err = nc.Request(subjects.PayloadSyncFor(b.id), body, 2*time.Second)
	if err == nil {
		t.Fatal("device a got an answer for b's payloads")
	}
	poll.Until(t, 5*time.Second, "permissions violation", func() bool { return perms.seen(subjects.PayloadSyncFor(b.id)) })
	// A's subject with a body about B (signed by A, or claiming B).
	if r := deviceAsk[model.PayloadSyncReply](t, nc, subjects.PayloadSyncFor(a.id), body); r.Error == "" || len(r.Payloads) != 0 {
		t.Errorf("a's request naming b: %+v", r)
	}
	if r := deviceAsk[model.PayloadSyncReply](t, nc, subjects.PayloadSyncFor(a.id), signedSync(t, a.creds.Key, a.id)); r.Error != "" || len(r.Payloads) != 0 {
		t.Errorf("a's own request got %+v", r)
	}

	// B's sealed payload, taken from the bucket, opens with B's key only.
	kv, err := c.JetStream().KeyValue(ctx, subjects.BucketPayloads)
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(ctx, b.id+".psk")
	if err != nil {
		t.Fatal(err)
	}
	var rec model.PayloadRecord
	_ = json.Unmarshal(e.Value(), &rec)
	xa, xb := deviceXKey(t, a), deviceXKey(t, b)
	if _, _, err := model.OpenPayload(&rec.Signed, b.id, []string{owner.Key()}, xa); err == nil || !strings.Contains(err.Error(), "does not open") {
		t.Errorf("a's key opened b's payload: %v", err)
	}
	if _, got, err := model.OpenPayload(&rec.Signed, b.id, []string{owner.Key()}, xb); err != nil || !bytes.Equal(got, secret) {
		t.Errorf("b's key: %v", err)
	}
}

func deviceXKey(t *testing.T, d *mdmDevice) nkeys.KeyPair {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(d.dir, agent.XKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	kp, err := nkeys.FromCurveSeed(bytes.TrimSpace(b))
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

func signedSync(t *testing.T, kp nkeys.KeyPair, dev string) []byte {
	t.Helper()
	s, err := model.Sign(kp, model.PurposePayloadSync, model.PayloadSync{Device: dev, Time: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(s)
	return b
}

// permSeen records the subjects of permission violations.
type permSeen struct {
	mu   sync.Mutex
	errs []string
}

func (p *permSeen) seen(subj string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, e := range p.errs {
		if strings.Contains(e, `"`+subj+`"`) {
			return true
		}
	}
	return false
}

func rawDeviceConn(t *testing.T, c *broker.Coordinator, cr *accounts.Creds) (*nats.Conn, *permSeen) {
	t.Helper()
	seed, _ := cr.Key.Seed()
	p := &permSeen{}
	nc, err := nats.Connect(c.ClientURL(), nats.UserJWTAndSeed(cr.JWT, string(seed)), nats.CustomInboxPrefix(cr.InboxPrefix()),
		nats.NoReconnect(), nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			p.mu.Lock()
			p.errs = append(p.errs, err.Error())
			p.mu.Unlock()
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc, p
}

// Bad input: an oversized payload is refused with a clear error and
// nothing is stored; one signed by another key than the requester's is
// refused; a payload that does not open on the device (sealed to another
// key, or altered before it was signed) is reported failed and no file is
// written.
func TestPayloadBadInput(t *testing.T) {
	c, owner, tok := mdmFleet(t, 2, "bad")
	a, dirA := payloadDevice(t, c, tok, "bad-a", owner.Key())
	b, _ := payloadDevice(t, c, tok, "bad-b", owner.Key())
	ctx := mdmCtx(t, time.Minute)
	ownerKey := readOwnerKey(t, c)
	devA, _ := owner.Device(ctx, a.id)
	devB, _ := owner.Device(ctx, b.id)

	big := bytes.Repeat([]byte("x"), model.MaxPayloadBytes+1)
	if _, err := model.SealPayload(ownerKey, devA.XKey, model.Payload{Name: "big", Device: a.id}, big, time.Now()); !errors.Is(err, model.ErrPayloadTooLarge) {
		t.Errorf("sealing an oversized payload: %v", err)
	}
	bigFile := filepath.Join(t.TempDir(), "big")
	_ = os.WriteFile(bigFile, big, 0o600)
	var out, errb bytes.Buffer
	if code := admin.Run(ctx, []string{"--server", c.ClientURL(), "--creds", ownerCredsPath(c), "payload", "push", "--device", "bad-a",
		"--name", "big", "--file", bigFile}, &out, &errb); code == 0 || !strings.Contains(errb.String(), "more than the 65536 bytes") {
		t.Errorf("push of an oversized file: %d %s", code, errb.String())
	}
	// Past the CLI: a signed document claiming a small size with big bytes.
	sender, _ := nkeys.CreateCurveKeys()
	spub, _ := sender.PublicKey()
	s, _ := model.Sign(ownerKey, model.PurposePayload, model.Payload{Name: "big", Device: a.id, Mode: 0o400, SHA256: "00", Size: 1,
		Sender: spub, Sealed: make([]byte, model.MaxPayloadBytes+100), Time: time.Now()})
	err := owner.Call(ctx, subjects.VerbPayloadPush, true, model.PayloadPush{Payloads: []model.Signed{s}}, nil)
	var ae *admin.APIError
	if !errors.As(err, &ae) || ae.Code != model.CodeBadRequest || !strings.Contains(err.Error(), "65536") {
		t.Errorf("oversized payload: %v", err)
	}
	// Signed by a stranger.
	st, _ := model.SealPayload(newUserKey(t), devA.XKey, model.Payload{Name: "x", Device: a.id}, []byte("x"), time.Now())
	err = owner.Call(ctx, subjects.VerbPayloadPush, true, model.PayloadPush{Payloads: []model.Signed{st}}, nil)
	if !errors.As(err, &ae) || ae.Code != model.CodeRefused {
		t.Errorf("payload signed by a stranger: %v", err)
	}
	if raw := rawBucket(t, c, subjects.BucketPayloads); len(raw) != 0 {
		t.Fatalf("refused pushes stored %d messages", len(raw))
	}

	// Sealed to b's key but addressed to a: a cannot open it.
	wrong, err := model.SealPayload(ownerKey, devB.XKey, model.Payload{Name: "wrong", Device: a.id}, []byte("secret"), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// Altered sealed bytes, signed after the alteration.
	good, _ := model.SealPayload(ownerKey, devA.XKey, model.Payload{Name: "altered", Device: a.id}, []byte("secret"), time.Now())
	var p model.Payload
	_ = good.Decode(&p)
	p.Sealed[len(p.Sealed)-1] ^= 1
	altered, _ := model.Sign(ownerKey, model.PurposePayload, p)
	if err := owner.Call(ctx, subjects.VerbPayloadPush, true, model.PayloadPush{Payloads: []model.Signed{wrong, altered}}, nil); err != nil {
		t.Fatal(err)
	}
	poll.Telling(t, 10*time.Second, "both reported failed", func() (bool, string) {
		vs := payloadsOf(t, owner, "")
		ok := len(vs) == 2
		for _, v := range vs {
			ok = ok && v.State == "failed" && strings.Contains(v.Error, "does not open")
		}
		return ok, mustJSONString(vs)
	})
	if ents, _ := os.ReadDir(dirA); len(ents) != 0 {
		t.Errorf("files written for payloads that did not open: %v", ents)
	}
}
