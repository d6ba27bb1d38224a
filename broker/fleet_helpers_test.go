package broker_test

import (
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/admin"
	"fleet/agent"
	"fleet/broker"
	"fleet/model"
	"fleet/subjects"
)

// startCoordinator runs a coordinator on a free port in a temp dir.
func startCoordinator(t *testing.T) *broker.Coordinator {
	t.Helper()
	cfg := broker.DefaultConfig()
	cfg.DataDir = t.TempDir()
	// Port 0 means the default port to nats-server: take a free one.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = ln.Addr().String()
	ln.Close()
	cfg.HTTP = ""
	ctx, cancel := context.WithCancel(context.Background())
	c, err := broker.Start(ctx, cfg, zerolog.Nop())
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); c.Close() })
	return c
}

func ownerCredsPath(c *broker.Coordinator) string {
	return filepath.Join(c.Config().DataDir, accounts.AdminCredsFile)
}

func ownerClient(t *testing.T, c *broker.Coordinator) *admin.Client {
	t.Helper()
	cl, err := admin.Dial(context.Background(), c.ClientURL(), ownerCredsPath(c))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

// addAdmin creates creds for role r and records them in fleet_admins.
func addAdmin(t *testing.T, c *broker.Coordinator, r subjects.Role, name string, groups ...string) *admin.Client {
	t.Helper()
	cr, err := c.Authority().NewUser(r, name, 0)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := c.JetStream().KeyValue(context.Background(), subjects.BucketAdmins)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(model.Admin{Key: cr.PublicKey(), Name: name, Role: string(r), Groups: groups, CreatedAt: time.Now()})
	if _, err := kv.Put(context.Background(), cr.PublicKey(), b); err != nil {
		t.Fatal(err)
	}
	cl, err := admin.DialCreds(context.Background(), c.ClientURL(), cr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

func createToken(t *testing.T, cl *admin.Client, uses int, approval bool, groups ...string) *model.TokenCreated {
	t.Helper()
	tok, err := cl.CreateToken(context.Background(), model.TokenCreate{Groups: groups, Uses: uses, TTL: time.Hour, Approval: approval})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// enrollAgent enrols a device through agent.LoadOrEnroll over TCP.
func enrollAgent(t *testing.T, c *broker.Coordinator, token, host string) (*accounts.Creds, string) {
	t.Helper()
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cr, err := agent.LoadOrEnroll(ctx, agent.EnrollOptions{
		Servers: []string{c.ClientURL()}, StateDir: dir, Token: token, Hostname: host, Log: zerolog.Nop(),
	})
	if err != nil {
		t.Fatalf("enrol %s: %v", host, err)
	}
	return cr, dir
}

// rawEnroll sends a signed enrollment request through the coordinator's
// own connection, to test the responder's checks directly.
func rawEnroll(t *testing.T, c *broker.Coordinator, data []byte) model.EnrollResponse {
	t.Helper()
	// Answered only into the inbox of the key that signed the request (or
	// of any key, when it does not parse): ask as that key would.
	var env model.Signed
	signer := ""
	if json.Unmarshal(data, &env) == nil && subjects.ValidDeviceID(env.Signer) {
		signer = env.Signer
	} else {
		kp, _ := nkeys.CreateUser()
		signer, _ = kp.PublicKey()
	}
	fc := c.ClientConn()
	inbox := subjects.DeviceInboxPrefix(subjects.DefaultSite, signer) + "." + nats.NewInbox()[len("_INBOX."):]
	s, err := fc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Unsubscribe()
	if err := fc.PublishRequest(subjects.Enroll, inbox, data); err != nil {
		t.Fatal(err)
	}
	msg, err := s.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var r model.EnrollResponse
	if err := json.Unmarshal(msg.Data, &r); err != nil {
		t.Fatalf("reply %q: %v", msg.Data, err)
	}
	return r
}

func signEnroll(t *testing.T, kp nkeys.KeyPair, req model.EnrollRequest) []byte {
	t.Helper()
	if req.Time.IsZero() {
		req.Time = time.Now()
	}
	s, err := model.Sign(kp, model.PurposeEnroll, req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(s)
	return b
}

func newUserKey(t *testing.T) nkeys.KeyPair {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

func newXKey(t *testing.T) string {
	t.Helper()
	kp, err := nkeys.CreateCurveKeys()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	return pub
}

// state is what a refused request must leave unchanged.
type state struct {
	devices int
	tokens  map[string]int // id -> uses left
}

func snapshot(t *testing.T, c *broker.Coordinator) state {
	t.Helper()
	ctx := context.Background()
	st := state{tokens: map[string]int{}}
	for _, b := range []string{subjects.BucketDevices, subjects.BucketTokens} {
		kv, err := c.JetStream().KeyValue(ctx, b)
		if err != nil {
			t.Fatal(err)
		}
		keys, err := kv.ListKeys(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for k := range keys.Keys() {
			if b == subjects.BucketDevices {
				st.devices++
				continue
			}
			e, err := kv.Get(ctx, k)
			if err != nil {
				t.Fatal(err)
			}
			var ti model.TokenInfo
			_ = json.Unmarshal(e.Value(), &ti)
			st.tokens[k] = ti.Uses
		}
	}
	return st
}

func equalState(a, b state) bool {
	if a.devices != b.devices || len(a.tokens) != len(b.tokens) {
		return false
	}
	for k, v := range a.tokens {
		if b.tokens[k] != v {
			return false
		}
	}
	return true
}

// editToken rewrites a stored token record (to expire it without waiting).
func editToken(t *testing.T, c *broker.Coordinator, id string, fn func(map[string]any)) {
	t.Helper()
	ctx := context.Background()
	kv, err := c.JetStream().KeyValue(ctx, subjects.BucketTokens)
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]any{}
	if err := json.Unmarshal(e.Value(), &m); err != nil {
		t.Fatal(err)
	}
	fn(m)
	b, _ := json.Marshal(m)
	if _, err := kv.Update(ctx, id, b, e.Revision()); err != nil {
		t.Fatal(err)
	}
}

// auditRecords reads every record of FLEET_AUDIT.
func auditRecords(t *testing.T, c *broker.Coordinator) []model.AuditRecord {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := c.JetStream().Stream(ctx, subjects.StreamAudit)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []model.AuditRecord
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			if err == jetstream.ErrMsgNotFound {
				continue
			}
			t.Fatal(err)
		}
		var r model.AuditRecord
		if err := json.Unmarshal(m.Data, &r); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func agentEnroll(ctx context.Context, url, dir, token, host string) (*accounts.Creds, error) {
	return agent.LoadOrEnroll(ctx, agent.EnrollOptions{Servers: []string{url}, StateDir: dir, Token: token, Hostname: host, Log: zerolog.Nop()})
}

func setAdminRole(t *testing.T, c *broker.Coordinator, key string, r subjects.Role) {
	t.Helper()
	ctx := context.Background()
	kv, err := c.JetStream().KeyValue(ctx, subjects.BucketAdmins)
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	var a model.Admin
	_ = json.Unmarshal(e.Value(), &a)
	a.Role = string(r)
	b, _ := json.Marshal(a)
	if _, err := kv.Put(ctx, key, b); err != nil {
		t.Fatal(err)
	}
}

// recordRelease records release id, one default closure, signed by c's
// first owner, through cl.
func recordRelease(t *testing.T, c *broker.Coordinator, cl *admin.Client, id string) model.Release {
	t.Helper()
	oc, err := accounts.ReadCreds(ownerCredsPath(c))
	if err != nil {
		t.Fatal(err)
	}
	rel := model.Release{ID: id, Name: id, CreatedAt: time.Now().UTC(), Author: oc.PublicKey(),
		Default: "/nix/store/" + strings.Repeat("a", 31) + "b-" + id}
	signed, err := model.Sign(oc.Key, model.PurposeRelease, rel)
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Call(context.Background(), subjects.VerbReleaseCreate, true, signed, nil); err != nil {
		t.Fatal(err)
	}
	return rel
}
