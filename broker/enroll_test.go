package broker_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/agent"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

func TestEnrollBadInputChangesNothing(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	ctx := context.Background()

	good := createToken(t, owner, 5, false, "lab")
	goodTok, err := model.ParseToken(good.Token)
	if err != nil {
		t.Fatal(err)
	}
	expired := createToken(t, owner, 5, false, "lab")
	expTok, _ := model.ParseToken(expired.Token)
	editToken(t, c, expTok.ID, func(m map[string]any) {
		m["expires_at"] = time.Now().Add(-time.Minute).Format(time.RFC3339Nano)
	})
	usedUp := createToken(t, owner, 1, false, "lab")
	usedTok, _ := model.ParseToken(usedUp.Token)
	if r := rawEnroll(t, c, signEnroll(t, newUserKey(t), model.EnrollRequest{TokenID: usedTok.ID, Secret: usedTok.Secret, XKey: newXKey(t), Hostname: "first"})); r.Error != "" {
		t.Fatalf("first use of a 1-use token refused: %s", r.Error)
	}
	revoked := createToken(t, owner, 5, false, "lab")
	revTok, _ := model.ParseToken(revoked.Token)
	if _, err := owner.RevokeToken(ctx, revTok.ID); err != nil {
		t.Fatal(err)
	}
	// A key already enrolled with another token.
	other := createToken(t, owner, 5, false, "lab")
	otherTok, _ := model.ParseToken(other.Token)
	enrolled := newUserKey(t)
	if r := rawEnroll(t, c, signEnroll(t, enrolled, model.EnrollRequest{TokenID: otherTok.ID, Secret: otherTok.Secret, XKey: newXKey(t), Hostname: "taken"})); r.Error != "" {
		t.Fatal(r.Error)
	}

	req := func(tok *model.ParsedToken) model.EnrollRequest {
		return model.EnrollRequest{TokenID: tok.ID, Secret: tok.Secret, XKey: newXKey(t), Hostname: "host1"}
	}
	forged := func() []byte {
		var s model.Signed
		_ = json.Unmarshal(signEnroll(t, newUserKey(t), req(goodTok)), &s)
		s.Signer, _ = newUserKey(t).PublicKey() // signature by another key
		b, _ := json.Marshal(s)
		return b
	}()
	// The same key spelled with a trailing character: nkeys decodes it, but
	// it would give one device two names (and a record no revoke matches).
	longKey := func() []byte {
		var s model.Signed
		_ = json.Unmarshal(signEnroll(t, newUserKey(t), req(goodTok)), &s)
		s.Signer += "A"
		b, _ := json.Marshal(s)
		return b
	}()
	badHost := req(goodTok)
	badHost.Hostname = "bad_host.example"
	wrongSecret := req(goodTok)
	// Another first character (the right one could be "x" itself).
	wrongSecret.Secret = map[bool]string{true: "y", false: "x"}[goodTok.Secret[0] == 'x'] + goodTok.Secret[1:]
	staleTime := req(goodTok)
	staleTime.Time = time.Now().Add(-3 * time.Hour)

	cases := []struct {
		name, want string
		data       []byte
	}{
		{"unknown token", "unknown enrollment token", signEnroll(t, newUserKey(t), model.EnrollRequest{TokenID: "0011223344556677", Secret: "s", XKey: newXKey(t), Hostname: "h"})},
		{"wrong secret", "unknown enrollment token", signEnroll(t, newUserKey(t), wrongSecret)},
		{"expired token", "expired", signEnroll(t, newUserKey(t), req(expTok))},
		{"used-up token", "used up", signEnroll(t, newUserKey(t), req(usedTok))},
		{"revoked token", "revoked", signEnroll(t, newUserKey(t), req(revTok))},
		{"bad signature", "signature", forged},
		{"non-canonical key", "not an nkey user public key", longKey},
		{"key under another token", "another token", signEnroll(t, enrolled, req(goodTok))},
		{"malformed JSON", "not a signed JSON", []byte(`{"payload":`)},
		{"not JSON at all", "not a signed JSON", []byte("hello")},
		{"invalid hostname", "not a valid host name", signEnroll(t, newUserKey(t), badHost)},
		{"stale time", "clock", signEnroll(t, newUserKey(t), staleTime)},
	}
	before := snapshot(t, c)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := rawEnroll(t, c, tc.data)
			if r.JWT != "" || r.Error == "" || r.Code == model.CodeInternal {
				t.Fatalf("got %+v, want a refusal", r)
			}
			if !strings.Contains(r.Error, tc.want) {
				t.Errorf("error %q does not say %q", r.Error, tc.want)
			}
			if after := snapshot(t, c); !equalState(before, after) {
				t.Errorf("state changed: %+v -> %+v", before, after)
			}
		})
	}
}

func TestEnrollIdempotentAndOneUseNotOverspent(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	tok := createToken(t, owner, 2, false, "lab")
	pt, _ := model.ParseToken(tok.Token)
	kp := newUserKey(t)
	xk := newXKey(t)
	for i := range 3 {
		r := rawEnroll(t, c, signEnroll(t, kp, model.EnrollRequest{TokenID: pt.ID, Secret: pt.Secret, XKey: xk, Hostname: "same"}))
		if r.Error != "" || r.JWT == "" {
			t.Fatalf("attempt %d: %+v", i, r)
		}
	}
	if st := snapshot(t, c); st.tokens[pt.ID] != 1 || st.devices != 1 {
		t.Fatalf("re-enrolling spent uses: %+v", st)
	}

	// Many devices race for a 1-use token: exactly one wins.
	one := createToken(t, owner, 1, false, "lab")
	po, _ := model.ParseToken(one.Token)
	var wg sync.WaitGroup
	var mu sync.Mutex
	wins := 0
	for i := range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rawEnroll(t, c, signEnroll(t, newUserKey(t), model.EnrollRequest{TokenID: po.ID, Secret: po.Secret, XKey: newXKey(t), Hostname: "racer" + string(rune('a'+i))}))
			if r.JWT != "" {
				mu.Lock()
				wins++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if st := snapshot(t, c); wins != 1 || st.tokens[po.ID] != 0 || st.devices != 2 {
		t.Fatalf("wins=%d, state %+v: want exactly one enrollment", wins, st)
	}
}

func TestAgentEnrollKeysAndRefusal(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	tok := createToken(t, owner, 1, false, "lab")
	cr, dir := enrollAgent(t, c, tok.Token, "alpha")
	for _, f := range []string{agent.KeyFile, agent.XKeyFile, agent.CredsFile} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
	// The second call loads the creds, no enrollment.
	again, err := agent.LoadOrEnroll(context.Background(), agent.EnrollOptions{StateDir: dir, Log: zerolog.Nop()})
	if err != nil || again.PublicKey() != cr.PublicKey() {
		t.Fatalf("LoadOrEnroll after enrollment: %v", err)
	}
	// A crash after the key was written but before creds: the same key is
	// reused and the same token answers again without another use.
	if err := os.Remove(filepath.Join(dir, agent.CredsFile)); err != nil {
		t.Fatal(err)
	}
	re, err := agent.LoadOrEnroll(context.Background(), agent.EnrollOptions{Servers: []string{c.ClientURL()}, StateDir: dir, Token: tok.Token, Hostname: "alpha", Log: zerolog.Nop()})
	if err != nil || re.PublicKey() != cr.PublicKey() {
		t.Fatalf("re-enrollment with the same key: %v", err)
	}

	// A used-up token is refused at once, not retried.
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err = agent.LoadOrEnroll(ctx, agent.EnrollOptions{Servers: []string{c.ClientURL()}, StateDir: t.TempDir(), Token: tok.Token, Hostname: "beta", Log: zerolog.Nop()})
	if !errors.Is(err, agent.ErrEnrollRefused) || !strings.Contains(err.Error(), "used up") {
		t.Fatalf("used-up token: %v", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("a refusal took %s: it must not be retried", time.Since(start))
	}
	// A damaged token is refused before any network use.
	_, err = agent.LoadOrEnroll(ctx, agent.EnrollOptions{StateDir: t.TempDir(), Token: "fleet1.nope", Hostname: "beta", Log: zerolog.Nop()})
	if !errors.Is(err, agent.ErrEnrollRefused) {
		t.Fatalf("damaged token: %v", err)
	}
	// Without creds and token: ErrNoIdentity.
	if _, err := agent.LoadOrEnroll(ctx, agent.EnrollOptions{StateDir: t.TempDir()}); !errors.Is(err, agent.ErrNoIdentity) {
		t.Fatalf("no token: %v", err)
	}
}

func TestAgentEnrollRetriesUntilCoordinatorUp(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	tok := createToken(t, owner, 1, false, "lab")
	// Nothing listens on this address: the agent retries until ctx ends.
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	_, err := agent.LoadOrEnroll(ctx, agent.EnrollOptions{Servers: []string{"nats://127.0.0.1:1"}, StateDir: t.TempDir(), Token: tok.Token, Hostname: "gamma", Log: zerolog.Nop()})
	if err == nil || errors.Is(err, agent.ErrEnrollRefused) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("unreachable coordinator: got %v, want a deadline error after retries", err)
	}
}

func TestApprovalAndRevokedKeyCannotReenrol(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	ctx := context.Background()
	tok := createToken(t, owner, 3, true, "lab")
	cr, dir := enrollAgent(t, c, tok.Token, "pend")
	d, err := owner.Device(ctx, "pend")
	if err != nil || d.Status != model.DevicePending {
		t.Fatalf("device after approval token: %+v, %v", d, err)
	}
	if d, err = owner.ApproveDevice(ctx, cr.PublicKey()[:10]); err != nil || d.Status != model.DeviceActive {
		t.Fatalf("approve: %+v, %v", d, err)
	}
	if _, err := owner.RevokeDevice(ctx, "pend"); err != nil {
		t.Fatal(err)
	}
	if _, err := owner.ApproveDevice(ctx, "pend"); err == nil {
		t.Fatal("a revoked device was approved")
	}
	// Same key, same (still valid) token: refused.
	_ = os.Remove(filepath.Join(dir, agent.CredsFile))
	_, err = agent.LoadOrEnroll(ctx, agent.EnrollOptions{Servers: []string{c.ClientURL()}, StateDir: dir, Token: tok.Token, Hostname: "pend", Log: zerolog.Nop()})
	if !errors.Is(err, agent.ErrEnrollRefused) || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("revoked key re-enrolled: %v", err)
	}
}

func TestDeviceAddressing(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	ctx := context.Background()
	tok := createToken(t, owner, 5, false, "lab")
	pt, _ := model.ParseToken(tok.Token)
	var ids []string
	for _, h := range []string{"twin", "twin", "solo"} {
		kp := newUserKey(t)
		pub, _ := kp.PublicKey()
		ids = append(ids, pub)
		if r := rawEnroll(t, c, signEnroll(t, kp, model.EnrollRequest{TokenID: pt.ID, Secret: pt.Secret, XKey: newXKey(t), Hostname: h})); r.Error != "" {
			t.Fatal(r.Error)
		}
		// The next enrolment must find this one in the index.
		poll.Until(t, 10*time.Second, "device in the index", func() bool {
			return slices.ContainsFunc(c.Status("").Devices, func(r model.DeviceStatusRow) bool { return r.ID == pub })
		})
	}
	// Two devices with one host name are shown apart.
	if d, err := owner.Device(ctx, "twin-2"); err != nil || d.ID != ids[1] || d.Host() != "twin" {
		t.Fatalf("the second twin: %+v %v", d, err)
	}
	// Records that share a name (written before names were made distinct)
	// make the name ambiguous: the error lists both.
	kv, err := c.JetStream().KeyValue(ctx, subjects.BucketDevices)
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(ctx, ids[1])
	if err != nil {
		t.Fatal(err)
	}
	var rec model.Device
	_ = json.Unmarshal(e.Value(), &rec)
	rec.Name, rec.Hostname = "twin", ""
	b, _ := json.Marshal(rec)
	if _, err := kv.Put(ctx, ids[1], b); err != nil {
		t.Fatal(err)
	}
	_, err = owner.Device(ctx, "twin")
	if err == nil || !strings.Contains(err.Error(), ids[0]) || !strings.Contains(err.Error(), ids[1]) {
		t.Fatalf("ambiguous name: %v, want an error listing both candidates", err)
	}
	if d, err := owner.Device(ctx, "solo"); err != nil || d.ID != ids[2] {
		t.Fatalf("by name: %+v %v", d, err)
	}
	if d, err := owner.Device(ctx, ids[0]); err != nil || d.ID != ids[0] {
		t.Fatalf("by ID: %+v %v", d, err)
	}
	if _, err := owner.Device(ctx, "nosuch"); err == nil || !strings.Contains(err.Error(), "no device") {
		t.Fatalf("unknown: %v", err)
	}
	if d, err := owner.SetDeviceGroups(ctx, "solo", []string{"b", "a", "a"}); err != nil || strings.Join(d.Groups, ",") != "a,b" {
		t.Fatalf("set-groups: %+v %v", d, err)
	}
	if _, err := owner.SetDeviceGroups(ctx, "solo", []string{"bad group"}); err == nil {
		t.Fatal("invalid group accepted")
	}
	// An operator limited to group "a" may not move a device into "lab".
	op := addAdmin(t, c, "operator", "op", "a")
	if _, err := op.SetDeviceGroups(ctx, "solo", []string{"lab"}); err == nil {
		t.Fatal("operator assigned a group outside its own")
	}
	if _, err := op.SetDeviceGroups(ctx, ids[0], []string{"a"}); err == nil {
		t.Fatal("operator changed a device outside its groups")
	}
}

// keep nkeys imported for helpers used only here in some builds.
var _ = nkeys.CreateUser

// TestDuplicateHostnamesShownApart: a second device enrolling with a host
// name another device has is shown under a distinct name, keeps its host
// name for releases, and a third gets the next free name.
func TestDuplicateHostnamesShownApart(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	ctx := context.Background()
	tok := createToken(t, owner, 3, false, "lab")
	var ids []string
	for i := range 3 {
		cr, _ := enrollAgent(t, c, tok.Token, "laptop")
		ids = append(ids, cr.PublicKey())
		// The next enrolment must find this one in the index.
		poll.Until(t, 10*time.Second, "device in the index", func() bool {
			return slices.ContainsFunc(c.Status("").Devices, func(r model.DeviceStatusRow) bool { return r.ID == ids[i] })
		})
	}
	want := map[string][2]string{ids[0]: {"laptop", ""}, ids[1]: {"laptop-2", "laptop"}, ids[2]: {"laptop-3", "laptop"}}
	for id, w := range want {
		d, err := owner.Device(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if d.Name != w[0] || d.Hostname != w[1] || d.Host() != "laptop" {
			t.Fatalf("device %s: name %q host name %q, want %q %q", id, d.Name, d.Hostname, w[0], w[1])
		}
	}
}
