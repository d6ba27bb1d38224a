package broker_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/admin"
	"fleet/agent"
	"fleet/broker"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// deviceConn connects with a device's creds over TCP and collects the
// server's asynchronous permission errors.
func deviceConn(t *testing.T, url string, cr *accounts.Creds, opts ...nats.Option) (*nats.Conn, chan error) {
	t.Helper()
	errs := make(chan error, 64)
	seed, _ := cr.Key.Seed()
	opts = append([]nats.Option{
		nats.UserJWTAndSeed(cr.JWT, string(seed)),
		nats.CustomInboxPrefix(cr.InboxPrefix()),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { errs <- err }),
	}, opts...)
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc, errs
}

// expectDenied runs try and waits for a permissions violation naming subj,
// either returned or reported asynchronously.
func expectDenied(t *testing.T, errs chan error, subj string, try func() error) {
	t.Helper()
	// On the hub the server maps the domain form $JS.<domain>.API to
	// $JS.API before the check, and names the mapped subject.
	mapped := subj
	if rest, ok := strings.CutPrefix(subj, "$JS."); ok {
		if _, tail, ok := strings.Cut(rest, ".API."); ok {
			mapped = "$JS.API." + tail
		}
	}
	denied := func(err error) bool {
		return err != nil && strings.Contains(strings.ToLower(err.Error()), "permissions violation") &&
			(strings.Contains(err.Error(), `"`+subj+`"`) || strings.Contains(err.Error(), `"`+mapped+`"`))
	}
	if err := try(); denied(err) {
		return
	}
	deadline := time.After(3 * time.Second)
	for {
		select {
		case err := <-errs:
			if denied(err) {
				return
			}
		case <-deadline:
			t.Errorf("no permissions violation for %s", subj)
			return
		}
	}
}

func TestDevicePermissionMatrix(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	tok := createToken(t, owner, 2, false, "lab")
	a, _ := enrollAgent(t, c, tok.Token, "dev-a")
	b, _ := enrollAgent(t, c, tok.Token, "dev-b")
	A, B := a.PublicKey(), b.PublicKey()
	nc, errs := deviceConn(t, c.ClientURL(), a)
	d := c.Config().Domain
	req := func(subj string) func() error {
		return func() error {
			_, err := nc.Request(subj, []byte("{}"), 300*time.Millisecond)
			return err
		}
	}
	pub := func(subj string) func() error { return func() error { return nc.Publish(subj, []byte("{}")) } }
	sub := func(subj string) func() error {
		return func() error {
			_, err := nc.SubscribeSync(subj)
			return err
		}
	}
	js := subjects.JSAPIPrefix(d)
	hub := subjects.DefaultSite
	cases := []struct {
		name, subj string
		try        func() error
	}{
		{"ask for B's desired state", subjects.DesiredGetFor(B), req(subjects.DesiredGetFor(B))},
		{"subscribe B's inbox", subjects.DeviceInboxPrefix(hub, B) + ".>", sub(subjects.DeviceInboxPrefix(hub, B) + ".>")},
		{"trigger B", subjects.DeviceNotify(hub, B), pub(subjects.DeviceNotify(hub, B))},
		{"command B", subjects.DeviceCmd(hub, B), pub(subjects.DeviceCmd(hub, B))},
		{"publish B's facts", subjects.DeviceFacts(B), pub(subjects.DeviceFacts(B))},
		{"publish B's events", subjects.DeviceEvents(B), pub(subjects.DeviceEvents(B))},
		{"subscribe its own facts (echo)", subjects.DeviceFacts(A), sub(subjects.DeviceFacts(A))},
		{"subscribe its own desired requests (echo)", subjects.DesiredGetFor(A), sub(subjects.DesiredGetFor(A))},
		{"KV of fleet_desired", js + ".STREAM.INFO." + subjects.KVStream(subjects.BucketDesired), req(js + ".STREAM.INFO." + subjects.KVStream(subjects.BucketDesired))},
		{"direct get of B's desired", subjects.DirectGetLast(d, subjects.KVStream(subjects.BucketDesired), subjects.KVKey(subjects.BucketDesired, B)), req(subjects.DirectGetLast(d, subjects.KVStream(subjects.BucketDesired), subjects.KVKey(subjects.BucketDesired, B)))},
		{"write fleet_admins", subjects.KVKey(subjects.BucketAdmins, A), pub(subjects.KVKey(subjects.BucketAdmins, A))},
		{"delete the audit", js + ".STREAM.DELETE." + subjects.StreamAudit, req(js + ".STREAM.DELETE." + subjects.StreamAudit)},
		{"publish audit", subjects.AuditSubject("x"), pub(subjects.AuditSubject("x"))},
		{"subscribe audit", subjects.AllAudit, sub(subjects.AllAudit)},
		{"API read verb", subjects.APIReadVerb(subjects.VerbDevices), req(subjects.APIReadVerb(subjects.VerbDevices))},
		{"API write verb", subjects.APIWriteVerb(subjects.VerbTokenCreate), req(subjects.APIWriteVerb(subjects.VerbTokenCreate))},
		{"subscribe >", ">", sub(">")},
		{"subscribe _INBOX.>", "_INBOX.>", sub("_INBOX.>")},
		{"enroll again", subjects.Enroll, req(subjects.Enroll)},
		{"consumer on the facts", js + ".CONSUMER.CREATE." + subjects.StreamFacts, req(js + ".CONSUMER.CREATE." + subjects.StreamFacts)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { expectDenied(t, errs, tc.subj, tc.try) })
	}

	// A's own subjects work: signed facts are stored, its own desired
	// state comes back, its inbox receives.
	seed, _ := a.Key.Seed()
	kp, _ := nkeys.FromSeed(seed)
	signed, _ := model.Sign(kp, model.PurposeFacts, model.Facts{Device: A, Hostname: "dev-a"})
	body, _ := json.Marshal(signed)
	m, err := nc.Request(subjects.DeviceFacts(A), body, 5*time.Second)
	var ack model.ReportAck
	if err != nil || json.Unmarshal(m.Data, &ack) != nil || ack.Seq == 0 {
		t.Errorf("A cannot send its own facts: %v %+v", err, ack)
	}
	if m, err := nc.Request(subjects.DesiredGetFor(A), nil, 5*time.Second); err != nil || !strings.Contains(string(m.Data), "{") {
		t.Errorf("A cannot read its own desired state: %v", err)
	}
	if _, err := nc.SubscribeSync(subjects.DeviceCmd(hub, A)); err != nil {
		t.Error(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errs:
		t.Errorf("own subjects raised %v", err)
	default:
	}
	// The coordinator saw A's facts: last seen is set.
	poll.Until(t, 2*time.Second, "A last seen", func() bool { return !c.Presence().LastSeen(A).IsZero() })
}

func TestRevokeConnectedDevice(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	ctx := context.Background()
	tok := createToken(t, owner, 2, false, "lab")
	a, dir := enrollAgent(t, c, tok.Token, "victim")
	other, _ := enrollAgent(t, c, tok.Token, "bystander")

	closed := make(chan struct{})
	nc, _ := deviceConn(t, c.ClientURL(), a, nats.NoReconnect(), nats.ClosedHandler(func(*nats.Conn) { close(closed) }))
	bnc, _ := deviceConn(t, c.ClientURL(), other)
	poll.Until(t, 2*time.Second, "victim online", func() bool { return c.Presence().Online(a.PublicKey()) })

	d, err := owner.RevokeDevice(ctx, "victim")
	if err != nil {
		t.Fatal(err)
	}
	if d.Status != model.DeviceRevoked {
		t.Errorf("status %s after revoke", d.Status)
	}
	select {
	case <-closed:
	case <-time.After(2 * time.Second):
		t.Fatal("revoked device still connected after 2s")
	}
	_ = nc
	if !bnc.IsConnected() {
		t.Error("revoking one device disconnected another")
	}
	seed, _ := a.Key.Seed()
	if nc2, err := nats.Connect(c.ClientURL(), nats.UserJWTAndSeed(a.JWT, string(seed)),
		nats.CustomInboxPrefix(a.InboxPrefix()), nats.NoReconnect()); err == nil {
		nc2.Close()
		t.Fatal("revoked device reconnected")
	} else if !authRefused(err) {
		t.Fatalf("reconnect of the revoked device: want an authorization error, got %v", err)
	}
	poll.Until(t, 2*time.Second, "victim offline", func() bool { return !c.Presence().Online(a.PublicKey()) })

	// Enrolling again needs a new key and a new token.
	tok2 := createToken(t, owner, 1, false, "lab")
	if err := os.Remove(filepath.Join(dir, agent.CredsFile)); err != nil {
		t.Fatal(err)
	}
	_, err = enrollWith(c, dir, tok2.Token, "victim")
	if !errors.Is(err, agent.ErrEnrollRefused) || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("revoked key with a new token: %v, want a refusal", err)
	}
	if _, err := enrollWith(c, t.TempDir(), tok.Token, "victim"); err == nil {
		t.Fatal("a new key enrolled with the old, used-up token")
	}
	fresh, _ := enrollAgent(t, c, tok2.Token, "victim")
	if fresh.PublicKey() == a.PublicKey() {
		t.Fatal("re-enrollment reused the revoked key")
	}
}

// authRefused reports whether err is the server refusing the credentials
// (not, say, a server that is down).
func authRefused(err error) bool {
	return errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthRevoked) || errors.Is(err, nats.ErrAuthExpired)
}

// dialTokenBearer connects with the bearer credential an enrollment token
// carries, as a brand-new device does to enrol.
func dialTokenBearer(url string, pt *model.ParsedToken, opts ...nats.Option) (*nats.Conn, error) {
	return nats.Connect(url, append([]nats.Option{
		nats.UserJWT(func() (string, error) { return pt.JWT, nil }, func([]byte) ([]byte, error) { return nil, nil }),
		nats.CustomInboxPrefix(pt.InboxPrefix()),
		nats.NoReconnect(),
		nats.Timeout(5 * time.Second),
	}, opts...)...)
}

func TestTokenRevokeClosesBearer(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	tok := createToken(t, owner, 5, false, "lab")
	pt, err := model.ParseToken(tok.Token)
	if err != nil {
		t.Fatal(err)
	}
	// Before the revocation the token's bearer credential connects.
	closed := make(chan struct{})
	asyncErrs := make(chan error, 16)
	bearer, err := dialTokenBearer(c.ClientURL(), pt, nats.ClosedHandler(func(*nats.Conn) { close(closed) }),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case asyncErrs <- err:
			default:
			}
		}))
	if err != nil {
		t.Fatalf("the token's bearer credential does not connect before the revocation: %v", err)
	}
	t.Cleanup(bearer.Close)

	if _, err := owner.RevokeToken(context.Background(), pt.ID); err != nil {
		t.Fatal(err)
	}
	// Its connection is closed, and it is refused from now on.
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("the bearer connection of a revoked token still open 5s after the revocation")
	}
	// The server said why: the errors are reported before the close.
	var why []error
drain:
	for {
		select {
		case err := <-asyncErrs:
			why = append(why, err)
		default:
			break drain
		}
	}
	if !slices.ContainsFunc(why, authRefused) {
		t.Errorf("bearer connection closed with errors %v, want its authentication revoked", why)
	}
	if nc, err := dialTokenBearer(c.ClientURL(), pt); err == nil {
		nc.Close()
		t.Fatal("the bearer credential of a revoked token connected")
	} else if !authRefused(err) {
		t.Fatalf("bearer of a revoked token: want an authorization error, got %v", err)
	}
	_, err = enrollWith(c, t.TempDir(), tok.Token, "late")
	if !errors.Is(err, agent.ErrEnrollRefused) || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("enrol with a revoked token: %v", err)
	}
	ts, err := owner.Tokens(context.Background())
	if err != nil || len(ts) != 1 || !ts[0].Revoked {
		t.Fatalf("token ls: %+v %v", ts, err)
	}
}

func TestAdminAPIRefusalsAreAudited(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	ctx := context.Background()
	args := model.TokenCreate{Groups: []string{"lab"}, Uses: 1, TTL: time.Hour}

	forged, err := owner.Sign(subjects.VerbTokenCreate, args, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	forged = []byte(strings.Replace(string(forged), `"uses":1`, `"uses":9`, 1))
	stale, _ := owner.Sign(subjects.VerbTokenCreate, args, time.Now().Add(-3*time.Minute))
	future, _ := owner.Sign(subjects.VerbTokenCreate, args, time.Now().Add(3*time.Minute))
	fresh, _ := owner.Sign(subjects.VerbTokenCreate, args, time.Now())
	if err := owner.Send(ctx, subjects.VerbTokenCreate, true, fresh, nil); err != nil {
		t.Fatalf("first send: %v", err)
	}
	wrongVerb, _ := owner.Sign(subjects.VerbDeviceRevoke, model.DeviceRef{Ref: "x"}, time.Now())
	viewer := addAdmin(t, c, subjects.RoleViewer, "viewer")
	// fleet_admins is authoritative: an admin whose record was lowered to
	// viewer still holds operator creds, and the coordinator refuses it.
	lowered := addAdmin(t, c, subjects.RoleOperator, "lowered")
	setAdminRole(t, c, lowered.Key(), subjects.RoleViewer)
	stranger, err := c.Authority().NewUser(subjects.RoleOwner, "stranger", 0)
	if err != nil {
		t.Fatal(err)
	}
	strangerCl, err := admin.DialCreds(ctx, c.ClientURL(), stranger)
	if err != nil {
		t.Fatal(err)
	}
	defer strangerCl.Close()

	for _, tc := range []struct {
		name, want string
		send       func() error
	}{
		{"forged", "signature", func() error { return owner.Send(ctx, subjects.VerbTokenCreate, true, forged, nil) }},
		{"stale", "clock", func() error { return owner.Send(ctx, subjects.VerbTokenCreate, true, stale, nil) }},
		{"future", "clock", func() error { return owner.Send(ctx, subjects.VerbTokenCreate, true, future, nil) }},
		{"replayed", "replayed", func() error { return owner.Send(ctx, subjects.VerbTokenCreate, true, fresh, nil) }},
		{"other verb", "signed for verb", func() error { return owner.Send(ctx, subjects.VerbTokenCreate, true, wrongVerb, nil) }},
		{"malformed", "not a signed JSON", func() error { return owner.Send(ctx, subjects.VerbTokenCreate, true, []byte("{"), nil) }},
		{"viewer record writes", "needs role operator", func() error { _, err := lowered.RevokeDevice(ctx, "x"); return err }},
		{"viewer lists tokens", "needs role owner", func() error { _, err := viewer.Tokens(ctx); return err }},
		{"not an admin", "not an admin", func() error { _, err := strangerCl.Tokens(ctx); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.send()
			var ae *admin.APIError
			if !errors.As(err, &ae) || ae.Code != model.CodeRefused || !strings.Contains(ae.Msg, tc.want) {
				t.Fatalf("got %v, want a refusal saying %q", err, tc.want)
			}
		})
	}
	// A viewer's write reaches the coordinator, which refuses it by role
	// (and audits the refusal); the client says so at once.
	start := time.Now()
	if _, err := viewer.RevokeDevice(ctx, "x"); err == nil || !strings.Contains(err.Error(), "may not call") {
		t.Errorf("viewer write: %v", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("a denied request took %s", time.Since(start))
	}
	// Only the one fresh request created a token.
	ts, err := owner.Tokens(ctx)
	if err != nil || len(ts) != 1 || ts[0].Uses != 1 {
		t.Fatalf("tokens after refusals: %+v %v", ts, err)
	}
	// A viewer may read.
	if _, err := viewer.Devices(ctx, ""); err != nil {
		t.Fatalf("viewer devices: %v", err)
	}
	recs := auditRecords(t, c)
	refusedN, okN := 0, 0
	for _, r := range recs {
		switch r.Result {
		case model.AuditRefused:
			refusedN++
		case model.AuditOK:
			okN++
			if r.Verb != subjects.VerbTokenCreate || r.Admin != "owner" {
				t.Errorf("ok record %+v", r)
			}
			if strings.Contains(string(r.Request), "fleet1.") {
				t.Error("audit holds a token")
			}
		}
	}
	if refusedN != 10 || okN != 1 {
		t.Fatalf("audit: %d refused, %d ok; want 10 and 1: %+v", refusedN, okN, recs)
	}
}

func enrollWith(c interface{ ClientURL() string }, dir, token, host string) (*accounts.Creds, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return agentEnroll(ctx, c.ClientURL(), dir, token, host)
}

// A request replayed after the coordinator restarted is still refused: the
// nonces of fresh requests outlive the process.
func TestReplayAfterRestartRefused(t *testing.T) {
	c := startCoordinator(t)
	cfg := c.Config()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	owner := ownerClient(t, c)
	env, err := owner.Sign(subjects.VerbTokenCreate, model.TokenCreate{Groups: []string{"g"}, Uses: 1, TTL: time.Hour}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := owner.Send(ctx, subjects.VerbTokenCreate, true, env, nil); err != nil {
		t.Fatal(err)
	}
	owner.Close()
	c.Close()
	<-c.Done()
	c2, err := broker.Start(ctx, cfg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	owner2 := ownerClient(t, c2)
	err = owner2.Send(ctx, subjects.VerbTokenCreate, true, env, nil)
	if err == nil || !strings.Contains(err.Error(), "replayed") {
		t.Fatalf("replay after restart: %v", err)
	}
	toks, err := owner2.Tokens(ctx)
	if err != nil || len(toks) != 1 {
		t.Fatalf("tokens after the replay: %d %v", len(toks), err)
	}
}

// A removed first owner stays removed after a restart.
func TestRemovedOwnerStaysRemoved(t *testing.T) {
	c := startCoordinator(t)
	cfg := c.Config()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	owner := ownerClient(t, c)
	// A second owner, through the API, so its creds outlive this client.
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	var added model.AdminAdded
	if err := owner.Call(ctx, subjects.VerbAdminAdd, true, model.AdminAdd{Name: "owner2", Role: "owner", Key: pub}, &added); err != nil {
		t.Fatal(err)
	}
	second := &accounts.Creds{JWT: added.JWT, Key: kp}
	cl1, err := admin.DialCreds(ctx, c.ClientURL(), second)
	if err != nil {
		t.Fatal(err)
	}
	if err := cl1.Call(ctx, subjects.VerbAdminRemove, true, model.AdminRef{Ref: "owner"}, nil); err != nil {
		t.Fatal(err)
	}
	cl1.Close()
	owner.Close()
	c.Close()
	<-c.Done()
	c2, err := broker.Start(ctx, cfg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	cl, err := admin.DialCreds(ctx, c2.ClientURL(), second)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	admins, err := cl.Admins(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range admins {
		if a.Name == "owner" {
			t.Fatalf("the removed owner is back: %+v", admins)
		}
	}
}
