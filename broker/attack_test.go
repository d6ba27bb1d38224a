package broker_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"fleet/accounts"
	"fleet/admin"
	"fleet/broker"
	"fleet/internal/poll"
	"fleet/internal/promvalue"
	"fleet/model"
	"fleet/subjects"
)

// The attacks of the security review, each through the real server with
// real credentials. After each, the owner's view of the fleet (admins,
// devices, tokens, desired states, the audit and its verification) is what
// it was, and the coordinator says what it dropped.

// ownerView digests what the owner relies on: every record of the
// buckets that decide who may do what, and the audit trail.
func ownerView(t *testing.T, c *broker.Coordinator) string {
	t.Helper()
	ctx := ctxFor(t, 10*time.Second)
	var lines []string
	for _, b := range []string{subjects.BucketAdmins, subjects.BucketDevices, subjects.BucketTokens, subjects.BucketDesired, subjects.BucketReleases} {
		kv, err := c.JetStream().KeyValue(ctx, b)
		if err != nil {
			t.Fatal(err)
		}
		keys, err := kv.ListKeys(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for k := range keys.Keys() {
			e, err := kv.Get(ctx, k)
			if err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(e.Value())
			lines = append(lines, b+"/"+k+"="+hex.EncodeToString(sum[:8]))
		}
	}
	recs := auditRecords(t, c)
	for _, r := range recs {
		if r.Result == model.AuditRefused {
			continue
		}
		env, req, err := model.ParseEnvelope(r.Request)
		if err != nil || env.Signer != r.Signer || req.Verb != r.Verb {
			t.Fatalf("audit entry %+v does not verify: %v", r, err)
		}
		lines = append(lines, "audit/"+r.Verb+"/"+r.Signer)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// dropped is fleet_requests_dropped_total{handler, reason}.
func dropped(t *testing.T, c *broker.Coordinator, handler, reason string) float64 {
	t.Helper()
	return metric(t, c, "fleet_requests_dropped_total", map[string]string{"handler": handler, "reason": reason})
}

func metric(t *testing.T, c *broker.Coordinator, name string, labels map[string]string) float64 {
	t.Helper()
	v, _, err := promvalue.Get(c.Metrics(), name, labels)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// rawConn connects as cr over TCP with its own inbox prefix.
func rawConn(t *testing.T, c *broker.Coordinator, cr *accounts.Creds, bearer bool) *nats.Conn {
	t.Helper()
	opts := []nats.Option{nats.CustomInboxPrefix(cr.InboxPrefix()), nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {})}
	if bearer {
		opts = append(opts, nats.UserJWT(func() (string, error) { return cr.JWT, nil }, func([]byte) ([]byte, error) { return nil, nil }))
	} else {
		seed, _ := cr.Key.Seed()
		opts = append(opts, nats.UserJWTAndSeed(cr.JWT, string(seed)))
	}
	nc, err := nats.Connect(c.ClientURL(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// adminCreds makes creds of role r and records the admin in fleet_admins.
func adminCreds(t *testing.T, c *broker.Coordinator, r subjects.Role, name string) *accounts.Creds {
	t.Helper()
	cr, err := c.Authority().NewUser(r, name, 0)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := c.JetStream().KeyValue(context.Background(), subjects.BucketAdmins)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(model.Admin{Key: cr.PublicKey(), Name: name, Role: string(r), CreatedAt: time.Now()})
	if _, err := kv.Put(context.Background(), cr.PublicKey(), b); err != nil {
		t.Fatal(err)
	}
	return cr
}

// publishWithReply publishes a request whose reply subject names the
// attacker's target, then flushes so the server has handled it.
func publishWithReply(t *testing.T, nc *nats.Conn, subj, reply string, data []byte) {
	t.Helper()
	if err := nc.PublishRequest(subj, reply, data); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

// ownerRecord is what an attacker would like to land in fleet_admins.
func ownerRecord(key string) []byte {
	b, _ := json.Marshal(model.Admin{Key: key, Name: "mallory", Role: string(subjects.RoleOwner), CreatedAt: time.Now()})
	return b
}

// The echo trick: a device sent a message to its own subject with a reply
// subject of its choosing, received it, and answered once into the
// state's buckets. Now no device may receive what it may send, answer a
// request, or name the state; from an active and from a pending device.
func TestEchoTrickRefused(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	active, _ := enrollAgent(t, c, createToken(t, owner, 1, false, "lab").Token, "active")
	pending, _ := enrollAgent(t, c, createToken(t, owner, 1, true, "lab").Token, "pending")
	if pending.Role() != subjects.RolePending {
		t.Fatalf("a device enrolled with an approval token got role %q", pending.Role())
	}
	before := ownerView(t, c)

	for _, cr := range []*accounts.Creds{active, pending} {
		id := cr.PublicKey()
		nc, errs := deviceConn(t, c.ClientURL(), cr)
		for _, subj := range []string{subjects.DeviceFacts(id), subjects.DeviceEvents(id), subjects.DesiredGetFor(id), subjects.Enroll} {
			expectDenied(t, errs, subj, func() error { _, err := nc.SubscribeSync(subj); return err })
		}
		for _, subj := range []string{subjects.KVKey(subjects.BucketAdmins, id), "$JS.API.STREAM.DELETE." + subjects.StreamAudit,
			"$JS." + subjects.Domain + ".API.STREAM.DELETE." + subjects.StreamAudit} {
			expectDenied(t, errs, subj, func() error { return nc.Publish(subj, ownerRecord(id)) })
		}
		// What it may send, it sends with the state as the reply: the
		// coordinator drops each request whose reply is not the sender's
		// own inbox.
		for _, subj := range []string{subjects.DeviceFacts(id), subjects.DeviceEvents(id), subjects.DesiredGetFor(id), subjects.Enroll} {
			nc.PublishRequest(subj, subjects.KVKey(subjects.BucketAdmins, id), ownerRecord(id))
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
		// A request answered into its own inbox carries no reply subject:
		// there is nothing to echo into.
		if cr == active {
			m, err := nc.Request(subjects.DesiredGetFor(id), nil, 5*time.Second)
			if err != nil || m.Reply != "" {
				t.Fatalf("own desired state: %v, reply subject %q", err, m.Reply)
			}
		}
	}
	poll.Until(t, 5*time.Second, "the coordinator dropping the injected replies", func() bool {
		// Only the pending device may send fleet.enroll, only the active
		// one its reports and desired-state requests.
		return dropped(t, c, "enroll", "reply_not_own_inbox") >= 1 && dropped(t, c, "desired", "reply_not_own_inbox") >= 1 &&
			dropped(t, c, "facts", "reply_not_own_inbox") >= 1 && dropped(t, c, "events", "reply_not_own_inbox") >= 1
	})
	if after := ownerView(t, c); after != before {
		t.Fatalf("the owner's view changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// Reply injection: the enrollment responder, the admin API, a device's
// report acknowledgement and a desired-state answer each went to whatever
// reply subject the caller chose, inside the account that held the state.
// Now the state is in another account, and every responder answers only
// the caller's own inbox.
func TestReplyInjectionRefused(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	ownerKey := owner.Key()
	tok := createToken(t, owner, 3, false, "lab")
	dev, _ := enrollAgent(t, c, tok.Token, "dev")
	other, _ := enrollAgent(t, c, tok.Token, "other")
	observer := adminCreds(t, c, subjects.RoleObserver, "dashboard")
	viewer := adminCreds(t, c, subjects.RoleViewer, "viewer")
	ctx := ctxFor(t, 30*time.Second)
	siteTok, err := owner.CreateToken(ctx, model.TokenCreate{Groups: []string{"lab"}, Uses: 1, TTL: time.Hour, Site: "berlin"})
	if err != nil {
		t.Fatal(err)
	}
	before := ownerView(t, c)
	targets := []string{
		subjects.KVKey(subjects.BucketAdmins, ownerKey),
		subjects.KVKey(subjects.BucketDevices, other.PublicKey()),
		subjects.AuditSubject("injected"),
		"$JS.API.STREAM.DELETE." + subjects.StreamAudit,
		subjects.DeviceNotify(subjects.DefaultSite, other.PublicKey()),
	}

	// Enrollment, with the token's own bearer credential.
	pt, _ := model.ParseToken(tok.Token)
	bearer := rawConn(t, c, &accounts.Creds{JWT: pt.JWT}, true)
	kp := newUserKey(t)
	req := signEnroll(t, kp, model.EnrollRequest{TokenID: pt.ID, Secret: pt.Secret, XKey: newXKey(t), Hostname: "mallory"})
	for _, reply := range targets {
		publishWithReply(t, bearer, subjects.Enroll, reply, req)
	}
	// Another device's inbox is refused too, after the token was read.
	publishWithReply(t, bearer, subjects.Enroll, subjects.DeviceInboxPrefix(subjects.DefaultSite, other.PublicKey())+".x", req)
	// A site's token answers only into that site's inboxes: its own key
	// under the hub's site (what the hub's link would carry) is refused.
	spt, _ := model.ParseToken(siteTok.Token)
	siteReq := signEnroll(t, kp, model.EnrollRequest{TokenID: spt.ID, Secret: spt.Secret, XKey: newXKey(t), Hostname: "mallory"})
	publishWithReply(t, bearer, subjects.Enroll, subjects.DeviceInboxPrefix(subjects.DefaultSite, spt.BearerKey)+".x", siteReq)

	// The admin API, by an observer and a viewer (signed requests whose
	// reply is not the signer's inbox, or is another admin's).
	for _, cr := range []*accounts.Creds{observer, viewer} {
		nc := rawConn(t, c, cr, false)
		cl := adminDial(t, c, cr)
		for _, reply := range append(targets, subjects.InboxPrefix(ownerKey)+".x") {
			env, err := cl.Sign(subjects.VerbDevices, nil, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			publishWithReply(t, nc, subjects.APIReadVerb(subjects.VerbDevices), reply, env)
		}
	}

	// A device's own facts and events (whose acknowledgement once came
	// from JetStream itself) and its own desired state.
	dnc := rawConn(t, c, dev, false)
	facts, _ := model.Sign(dev.Key, model.PurposeFacts, model.Facts{Device: dev.PublicKey(), Hostname: "dev"})
	fb, _ := json.Marshal(facts)
	ev, _ := model.Sign(dev.Key, model.PurposeEvent, model.Event{Device: dev.PublicKey(), Time: time.Now(), State: model.StateIdle})
	eb, _ := json.Marshal(ev)
	for _, reply := range targets {
		publishWithReply(t, dnc, subjects.DeviceFacts(dev.PublicKey()), reply, fb)
		publishWithReply(t, dnc, subjects.DeviceEvents(dev.PublicKey()), reply, eb)
		publishWithReply(t, dnc, subjects.DesiredGetFor(dev.PublicKey()), reply, nil)
	}

	n := float64(len(targets))
	poll.Until(t, 5*time.Second, "every injected request dropped", func() bool {
		return dropped(t, c, "enroll", "reply_not_own_inbox") >= n+2 &&
			dropped(t, c, "api", "reply_not_own_inbox") >= 2*(n+1) &&
			dropped(t, c, "facts", "reply_not_own_inbox") >= n &&
			dropped(t, c, "events", "reply_not_own_inbox") >= n &&
			dropped(t, c, "desired", "reply_not_own_inbox") >= n
	})
	if after := ownerView(t, c); after != before {
		t.Fatalf("the owner's view changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	// Nothing of it was stored: the device's reports were dropped whole.
	facts2, err := c.JetStream().Stream(ctx, subjects.StreamFacts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := facts2.GetLastMsgForSubject(ctx, subjects.DeviceFacts(dev.PublicKey())); err == nil {
		t.Error("facts sent with an injected reply were stored")
	}
	// And the owner still works, as owner.
	if _, err := owner.Tokens(ctx); err != nil {
		t.Fatalf("owner after the attacks: %v", err)
	}
}

// adminDial connects as the admin cr, the way fleet-admin does.
func adminDial(t *testing.T, c *broker.Coordinator, cr *accounts.Creds) *admin.Client {
	t.Helper()
	cl, err := admin.DialCreds(context.Background(), c.ClientURL(), cr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

// A flood of refused requests: the audit keeps each as a hash, and only a
// bounded number per sender; the owner's own writes are still recorded.
func TestAuditFloodBounded(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	viewer := adminCreds(t, c, subjects.RoleViewer, "viewer")
	ctx := ctxFor(t, 60*time.Second)
	cl := adminDial(t, c, viewer)
	big := strings.Repeat("x", 60<<10)
	const flood = 300
	start := time.Now()
	for range flood {
		// A write the viewer's role may not make, 60 KiB each.
		err := cl.Call(ctx, subjects.VerbTokenCreate, true, model.TokenCreate{Groups: []string{big}, Uses: 1, TTL: time.Hour}, nil)
		if err == nil || !strings.Contains(err.Error(), "needs role owner") {
			t.Fatalf("viewer token-create: %v", err)
		}
	}
	elapsed := time.Since(start)
	if _, err := owner.CreateToken(ctx, model.TokenCreate{Groups: []string{"lab"}, Uses: 1, TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	recs := auditRecords(t, c)
	refused, ok := 0, 0
	for _, r := range recs {
		switch r.Result {
		case model.AuditRefused:
			refused++
			if len(r.Request) != 0 || r.RequestHash == "" || r.RequestBytes < 60<<10 || r.Signer != viewer.PublicKey() {
				t.Fatalf("refused entry keeps more than its hash, size and signer: %+v", r)
			}
		case model.AuditOK:
			ok++
		}
	}
	// A burst of 60, then one a second.
	if limit := 60 + int(elapsed.Seconds()) + 2; refused > limit || refused < 60 {
		t.Fatalf("%d refused entries from a flood of %d in %s; want 60..%d", refused, flood, elapsed, limit)
	}
	if ok != 1 {
		t.Fatalf("the owner's write after the flood: %d ok entries", ok)
	}
	if s := metric(t, c, "fleet_audit_refusals_suppressed_total", nil); s < float64(flood-refused) {
		t.Fatalf("suppressed refusals counted %v, want %d", s, flood-refused)
	}
	audit, err := c.JetStream().Stream(ctx, subjects.StreamAudit)
	if err != nil {
		t.Fatal(err)
	}
	info, err := audit.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Bytes > 256<<10 {
		t.Fatalf("the flood stored %d bytes of audit", info.State.Bytes)
	}
	if v := metric(t, c, "fleet_jetstream_stream_max_bytes", map[string]string{"stream": subjects.StreamAudit}); v <= 0 {
		t.Error("no fleet_jetstream_stream_max_bytes for the audit")
	}
}

// A device that floods: reports past its rate are refused (not stored),
// an oversized one is refused for good, and its connection cannot hold
// more subscriptions than its role allows.
func TestDeviceFloodBounded(t *testing.T) {
	d := newReportingDevice(t, "noisy")
	c, dev, id, nc, errs, send := d.c, d.dev, d.id, d.nc, d.errs, d.send
	ctx := ctxFor(t, 60*time.Second)

	stored, limited := 0, 0
	start := time.Now()
	for i := range 400 {
		ack := send(model.Event{Device: id, Time: time.Now(), State: model.StateChecking, Attempt: fmt.Sprint(i)})
		switch {
		case ack.Seq > 0:
			stored++
		case strings.Contains(ack.Error, "too many"):
			limited++
		default:
			t.Fatalf("event %d: %+v", i, ack)
		}
	}
	elapsed := time.Since(start)
	if limit := 120 + int(5*elapsed.Seconds()) + 5; stored > limit || limited == 0 {
		t.Fatalf("%d of 400 events stored in %s (limit %d), %d refused", stored, elapsed, limit, limited)
	}
	events, err := c.JetStream().Stream(ctx, subjects.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	info, err := events.Info(ctx, jetstream.WithSubjectFilter(subjects.DeviceEvents(id)))
	if err != nil {
		t.Fatal(err)
	}
	if int(info.State.Msgs) != stored {
		t.Fatalf("stream holds %d events, %d were acknowledged", info.State.Msgs, stored)
	}

	// Oversized: refused for good, never stored.
	poll.Until(t, 10*time.Second, "a token back", func() bool {
		ack := send(model.Event{Device: id, Time: time.Now(), State: model.StateReporting, Result: model.ResultFailed,
			Log: strings.Repeat("L", model.MaxEventBytes)})
		if strings.Contains(ack.Error, "too many") {
			return false
		}
		if !ack.Permanent || ack.Seq != 0 {
			t.Fatalf("oversized event: %+v", ack)
		}
		return true
	})

	// Subscriptions are capped by the role.
	var subErr error
	for i := range 64 {
		if _, err := nc.SubscribeSync(fmt.Sprintf("%s.flood.%d", dev.InboxPrefix(), i)); err != nil {
			subErr = err
			break
		}
		if err := nc.Flush(); err != nil {
			subErr = err
			break
		}
	}
	if subErr == nil {
		select {
		case subErr = <-errs:
		case <-time.After(5 * time.Second):
		}
	}
	if subErr == nil || !strings.Contains(strings.ToLower(subErr.Error()), "maximum subscriptions") {
		t.Fatalf("64 subscriptions on one device connection: %v", subErr)
	}
}

// The audit is a chain: entries the coordinator appends name the one
// before; an entry slipped in by anyone else breaks it where it stands.
func TestAuditChainShowsInsertions(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	ctx := ctxFor(t, 30*time.Second)
	for range 3 {
		if _, err := owner.CreateToken(ctx, model.TokenCreate{Groups: []string{"lab"}, Uses: 1, TTL: time.Hour}); err != nil {
			t.Fatal(err)
		}
	}
	if b := model.CheckAuditChain(auditRecords(t, c)); len(b) != 0 {
		t.Fatalf("the coordinator's own chain is broken at %v", b)
	}
	// Someone with the state's own credentials appends a record.
	forged, _ := json.Marshal(model.AuditRecord{Time: time.Now().UTC(), Verb: subjects.VerbAdminAdd, Result: model.AuditOK})
	if _, err := c.JetStream().Publish(ctx, subjects.AuditSubject(subjects.VerbAdminAdd), forged); err != nil {
		t.Fatal(err)
	}
	if _, err := owner.CreateToken(ctx, model.TokenCreate{Groups: []string{"lab"}, Uses: 1, TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	recs := auditRecords(t, c)
	broken := model.CheckAuditChain(recs)
	if len(broken) != 1 || recs[broken[0]].Verb != subjects.VerbAdminAdd {
		t.Fatalf("chain breaks at %v, want only at the inserted entry", broken)
	}
}

// What a device says its apply read from the fleet cache feeds the
// cache's fetched metrics once, under the device's own site: a resent
// result (the same event ID) is not counted again, and counts no apply
// could have are refused for good, nothing stored.
func TestFetchedCountsFromResults(t *testing.T) {
	d := newReportingDevice(t, "fetcher")
	c, id, send := d.c, d.id, d.send
	fetched := func(name, source string) float64 {
		return metric(t, c, name, map[string]string{"site": subjects.DefaultSite, "source": source})
	}
	result := model.Event{Device: id, Time: time.Now().UTC(), State: model.StateReporting, Result: model.ResultSucceeded, Attempt: "a1",
		Cache: &model.CacheFetch{HubNarInfos: 3, HubBytes: 5000, SiteNarInfos: 1, SiteBytes: 700}}
	for i := range 2 {
		if ack := send(result); ack.Seq == 0 || ack.Duplicate != (i == 1) {
			t.Fatalf("result %d: %+v", i, ack)
		}
	}
	poll.Until(t, 5*time.Second, "the result's counts", func() bool {
		return fetched("fleet_cache_fetched_bytes_total", "hub") == 5000
	})
	if p, sp, sb := fetched("fleet_cache_fetched_paths_total", "hub"), fetched("fleet_cache_fetched_paths_total", "site"), fetched("fleet_cache_fetched_bytes_total", "site"); p != 3 || sp != 1 || sb != 700 {
		t.Fatalf("fetched: hub paths %v, site paths %v, site bytes %v", p, sp, sb)
	}
	for _, bad := range []model.CacheFetch{{HubBytes: -1}, {SiteNarInfos: -5}, {HubBytes: 1 << 50}, {SiteNarInfos: 1 << 30}} {
		ev := result
		ev.Attempt, ev.Cache = "bad", &bad
		if ack := send(ev); ack.Seq != 0 || !ack.Permanent || !strings.Contains(ack.Error, "cache counts") {
			t.Fatalf("counts %+v: %+v", bad, ack)
		}
	}
	if v := fetched("fleet_cache_fetched_bytes_total", "hub"); v != 5000 {
		t.Fatalf("after the refused results: %v hub bytes", v)
	}
}

// reportingDevice is a device enrolled on a coordinator of its own, on
// its own connection (errs: the connection's async errors).
type reportingDevice struct {
	t    *testing.T
	c    *broker.Coordinator
	dev  *accounts.Creds
	id   string
	nc   *nats.Conn
	errs chan error
}

func newReportingDevice(t *testing.T, name string) *reportingDevice {
	t.Helper()
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	dev, _ := enrollAgent(t, c, createToken(t, owner, 1, false, "lab").Token, name)
	nc, errs := deviceConn(t, c.ClientURL(), dev)
	return &reportingDevice{t: t, c: c, dev: dev, id: dev.PublicKey(), nc: nc, errs: errs}
}

// send sends ev, signed by the device, and returns the coordinator's
// acknowledgement.
func (d *reportingDevice) send(ev model.Event) model.ReportAck {
	return sendEvent(d.t, d.nc, d.dev, ev)
}

// sendEvent sends ev signed as dev over nc and returns the coordinator's
// acknowledgement.
func sendEvent(t *testing.T, nc *nats.Conn, dev *accounts.Creds, ev model.Event) model.ReportAck {
	t.Helper()
	s, err := model.Sign(dev.Key, model.PurposeEvent, ev)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(s)
	m, err := nc.Request(subjects.DeviceEvents(dev.PublicKey()), b, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var ack model.ReportAck
	if err := json.Unmarshal(m.Data, &ack); err != nil {
		t.Fatal(err)
	}
	return ack
}
