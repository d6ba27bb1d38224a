package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"fleet/accounts"
	"fleet/subjects"
)

// The role templates are enforced by the server itself: every case below
// is a real client over TCP against the embedded server, and a refusal is
// the server's permissions violation, not a check in our code.
func TestRoleTemplatesEnforcedByServer(t *testing.T) {
	c := startCoordinator(t, testConfig(t.TempDir()))
	auth := c.Authority()
	url := c.ClientURL()
	domain := c.Config().Domain
	coord := c.Conn()
	ctx := ctxT(t, 60*time.Second)

	creds := map[string]*accounts.Creds{}
	for name, r := range map[string]subjects.Role{
		"agentA": subjects.RoleAgent, "agentB": subjects.RoleAgent,
		"viewer": subjects.RoleViewer, "operator": subjects.RoleOperator, "owner": subjects.RoleOwner,
		"observer": subjects.RoleObserver, "enroll": subjects.RoleEnroll, "leaf": subjects.RoleLeaf,
	} {
		cr, err := auth.NewUser(r, name, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		creds[name] = cr
	}
	A, B := creds["agentA"].PublicKey(), creds["agentB"].PublicKey()

	clients := map[string]*client{}
	for name, cr := range creds {
		var cl *client
		var err error
		switch name {
		case "leaf":
			continue // checked below: leaf users are bound to leaf node connections
		case "enroll":
			cl, err = dialBearer(url, cr)
		default:
			cl, err = dial(url, cr)
		}
		if err != nil {
			t.Fatalf("connect %s: %v", name, err)
		}
		t.Cleanup(cl.Close)
		clients[name] = cl
	}

	// Desired states for both devices, written by the coordinator.
	desired, err := c.JetStream().KeyValue(ctx, subjects.BucketDesired)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{A, B} {
		if _, err := desired.Put(ctx, id, []byte("desired-"+id)); err != nil {
			t.Fatal(err)
		}
	}
	js := func(name string) string { return subjects.JSAPIPrefix(domain) + name }

	const (
		pub        = "pub"        // plain publish; the coordinator listens
		sub        = "sub"        // subscribe; the coordinator publishes probe
		jsPub      = "jspub"      // JetStream publish through the domain, wants a PubAck
		streamInfo = "streaminfo" // JetStream stream info through the domain
		get        = "directget"  // raw direct-get request through the domain; subj is the key's device
		getLocal   = "directget-local"
	)
	// The hub checks a JetStream API subject after mapping the domain form
	// to the local one, so a refusal may name either.
	forms := func(subj string) []string {
		if rest, ok := strings.CutPrefix(subj, subjects.JSAPIPrefix(domain)); ok {
			return []string{subj, subjects.JSAPIPrefix("") + rest}
		}
		return []string{subj}
	}
	cases := []struct {
		user, op, subj string
		probe          string // for sub: a literal subject the filter matches
		allow          bool
	}{
		// Agent of device A: its own subjects only.
		{"agentA", jsPub, subjects.DeviceFacts(A), "", true},
		{"agentA", jsPub, subjects.DeviceEvents(A), "", true},
		{"agentA", pub, subjects.DeviceFacts(A), "", true},
		{"agentA", sub, subjects.DeviceAll(A), subjects.DeviceCmd(A), true},
		{"agentA", sub, subjects.DeviceDesired(A), "", true},
		{"agentA", sub, subjects.DeviceInboxPrefix(A) + ".>", subjects.DeviceInboxPrefix(A) + ".x", true},
		{"agentA", get, A, "", true},
		{"agentA", pub, subjects.DeviceFacts(B), "", false},
		{"agentA", pub, subjects.DeviceCmd(B), "", false},
		{"agentA", jsPub, subjects.DeviceFacts(B), "", false},
		{"agentA", get, B, "", false},
		{"agentA", sub, subjects.DeviceAll(B), subjects.DeviceDesired(B), false},
		{"agentA", sub, subjects.DeviceDesired(B), "", false},
		{"agentA", sub, ">", "fleet.probe", false},
		{"agentA", sub, "_INBOX.>", "_INBOX.probe", false},
		{"agentA", sub, subjects.DeviceInboxPrefix(B) + ".>", subjects.DeviceInboxPrefix(B) + ".x", false},
		{"agentA", sub, subjects.AllDevices, subjects.DeviceFacts(B), false},
		{"agentA", pub, subjects.Enroll, "", false},
		{"agentA", pub, subjects.APIReadVerb("devices"), "", false},
		{"agentA", pub, "_INBOX.spoof", "", false},
		{"agentA", getLocal, A, "", true},
		{"agentA", getLocal, B, "", false},
		{"agentA", streamInfo, subjects.StreamFacts, "", false},
		{"agentB", jsPub, subjects.DeviceFacts(B), "", true},
		{"agentB", get, B, "", true},
		{"agentB", pub, subjects.DeviceEvents(A), "", false},
		{"agentB", get, A, "", false},

		// Viewer: read verbs and the facts and events streams.
		{"viewer", pub, subjects.APIReadVerb("devices"), "", true},
		// Write verbs reach the coordinator, which refuses and audits them.
		{"viewer", pub, subjects.APIWriteVerb("deploy"), "", true},
		{"viewer", pub, subjects.APIWriteVerb("tokens"), "", true},
		{"viewer", streamInfo, subjects.StreamFacts, "", true},
		{"viewer", streamInfo, subjects.StreamEvents, "", true},
		{"viewer", streamInfo, subjects.StreamAudit, "", false},
		{"viewer", pub, subjects.DeviceCmd(A), "", false},
		{"viewer", pub, subjects.Enroll, "", false},
		{"viewer", sub, subjects.DeviceAll(A), subjects.DeviceFacts(A), false},
		{"viewer", sub, "_INBOX.>", "_INBOX.probe", false},
		{"viewer", sub, ">", "fleet.probe", false},

		// Operator: viewer plus write verbs.
		{"operator", pub, subjects.APIReadVerb("devices"), "", true},
		{"operator", pub, subjects.APIWriteVerb("deploy"), "", true},
		{"operator", streamInfo, subjects.StreamFacts, "", true},
		{"operator", streamInfo, subjects.StreamAudit, "", false},
		{"operator", pub, subjects.DeviceCmd(A), "", false},
		{"operator", pub, js(".STREAM.DELETE.") + subjects.StreamFacts, "", false},
		{"operator", sub, "_INBOX.>", "_INBOX.probe", false},

		// Observer: a few read verbs.
		{"observer", pub, subjects.APIReadVerb("devices"), "", true},
		{"observer", pub, subjects.APIReadVerb("facts"), "", true},
		{"observer", pub, subjects.APIReadVerb("tokens"), "", false},
		{"observer", pub, subjects.APIWriteVerb("deploy"), "", false},
		{"observer", sub, "_INBOX.>", "_INBOX.probe", false},

		// Enroll: a bearer credential for fleet.enroll only.
		{"enroll", pub, subjects.Enroll, "", true},
		{"enroll", pub, subjects.APIReadVerb("devices"), "", false},
		{"enroll", pub, subjects.DeviceFacts(A), "", false},
		{"enroll", jsPub, subjects.DeviceFacts(A), "", false},
		{"enroll", sub, subjects.DeviceAll(A), subjects.DeviceCmd(A), false},
		{"enroll", sub, "_INBOX.>", "_INBOX.probe", false},

		// Owner: everything it needs, but not other users' replies.
		{"owner", pub, subjects.APIWriteVerb("tokens"), "", true},
		{"owner", pub, subjects.DeviceCmd(A), "", true},
		{"owner", jsPub, subjects.DeviceFacts(B), "", true},
		{"owner", jsPub, subjects.AuditSubject("test"), "", true},
		{"owner", streamInfo, subjects.StreamAudit, "", true},
		{"owner", streamInfo, subjects.KVStream(subjects.BucketTokens), "", true},
		{"owner", sub, subjects.AllDevices, subjects.DeviceFacts(A), true},
		{"owner", sub, "_INBOX.>", "_INBOX.probe", false},
		{"owner", sub, ">", "$JS.EVENT.probe", false},
		{"owner", sub, subjects.DeviceInboxPrefix(A) + ".>", subjects.DeviceInboxPrefix(A) + ".x", false},
	}
	for i, tc := range cases {
		verdict := "denied"
		if tc.allow {
			verdict = "allowed"
		}
		name := fmt.Sprintf("%02d/%s/%s/%s/%s", i, tc.user, tc.op, tc.subj, verdict)
		t.Run(name, func(t *testing.T) {
			cl := clients[tc.user]
			switch tc.op {
			case pub:
				watch, err := coord.SubscribeSync(tc.subj)
				if err != nil {
					t.Fatal(err)
				}
				defer watch.Unsubscribe()
				if err := coord.Flush(); err != nil {
					t.Fatal(err)
				}
				if err := cl.Publish(tc.subj, []byte("probe")); err != nil {
					t.Fatal(err)
				}
				if tc.allow {
					if _, err := watch.NextMsg(5 * time.Second); err != nil {
						t.Fatalf("allowed publish did not arrive: %v", err)
					}
					if err := cl.errs.violation("Publish", forms(tc.subj)...); err != nil {
						t.Fatalf("allowed publish reported %v", err)
					}
					return
				}
				cl.errs.waitViolation(t, 5*time.Second, "Publish", forms(tc.subj)...)
				// The server has dropped the message; the coordinator's
				// round trip proves nothing reached it before.
				if err := coord.Flush(); err != nil {
					t.Fatal(err)
				}
				if n, _, _ := watch.Pending(); n != 0 {
					t.Fatalf("a refused publish was delivered (%d messages)", n)
				}

			case sub:
				probe := tc.probe
				if probe == "" {
					probe = tc.subj
				}
				s, err := cl.SubscribeSync(tc.subj)
				if err != nil {
					t.Fatal(err)
				}
				defer s.Unsubscribe()
				if err := cl.Flush(); err != nil {
					t.Fatal(err)
				}
				if !tc.allow {
					cl.errs.waitViolation(t, 5*time.Second, "Subscription", tc.subj)
				}
				if err := coord.Publish(probe, []byte("probe")); err != nil {
					t.Fatal(err)
				}
				if err := coord.Flush(); err != nil {
					t.Fatal(err)
				}
				if tc.allow {
					m, err := s.NextMsg(5 * time.Second)
					if err != nil || m.Subject != probe {
						t.Fatalf("allowed subscription got %v, %v", m, err)
					}
					if err := cl.errs.violation("Subscription", tc.subj); err != nil {
						t.Fatalf("allowed subscription reported %v", err)
					}
					return
				}
				// Anything the server had delivered would be ahead of this
				// round trip's reply.
				if err := cl.Flush(); err != nil {
					t.Fatal(err)
				}
				if n, _, _ := s.Pending(); n != 0 {
					t.Fatalf("a refused subscription received %d messages", n)
				}

			case jsPub, streamInfo, get, getLocal:
				var subject string
				var do func(ctx context.Context) error
				switch tc.op {
				case jsPub:
					subject = tc.subj
					do = func(ctx context.Context) error {
						j, err := jetstream.NewWithDomain(cl.Conn, domain)
						if err != nil {
							return err
						}
						ack, err := j.Publish(ctx, tc.subj, []byte(`{"probe":true}`))
						if err == nil && ack.Domain != domain {
							return fmt.Errorf("PubAck from domain %q", ack.Domain)
						}
						return err
					}
				case streamInfo:
					subject = js(".STREAM.INFO." + tc.subj)
					do = func(ctx context.Context) error {
						j, err := jetstream.NewWithDomain(cl.Conn, domain)
						if err != nil {
							return err
						}
						_, err = j.Stream(ctx, tc.subj)
						return err
					}
				case get, getLocal:
					subject = subjects.DesiredDirectGet(domain, tc.subj)
					if tc.op == getLocal {
						subject = subjects.DesiredDirectGet("", tc.subj)
					}
					do = func(ctx context.Context) error {
						m, err := cl.RequestWithContext(ctx, subject, nil)
						if err != nil {
							return err
						}
						if st := m.Header.Get("Status"); st != "" {
							return fmt.Errorf("direct get status %s %s", st, m.Header.Get("Description"))
						}
						if string(m.Data) != "desired-"+tc.subj || m.Header.Get(jetstream.SubjectHeader) != subjects.KVKey(subjects.BucketDesired, tc.subj) {
							return fmt.Errorf("direct get returned %q for %s", m.Data, m.Header.Get(jetstream.SubjectHeader))
						}
						return nil
					}
				}
				if tc.allow {
					if err := do(ctxT(t, 5*time.Second)); err != nil {
						t.Fatalf("allowed %s failed: %v", tc.op, err)
					}
					if err := cl.errs.violation("Publish", forms(subject)...); err != nil {
						t.Fatalf("allowed %s reported %v", tc.op, err)
					}
					return
				}
				// A refused request never gets an answer: wait for the
				// server's refusal, then give up on the request.
				rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				res := make(chan error, 1)
				go func() { res <- do(rctx) }()
				cl.errs.waitViolation(t, 5*time.Second, "Publish", forms(subject)...)
				cancel()
				if err := <-res; err == nil {
					t.Fatalf("refused %s succeeded", tc.op)
				}
			default:
				t.Fatalf("unknown op %s", tc.op)
			}
		})
	}

	t.Run("agent receives the RePublish of its desired state", func(t *testing.T) {
		a, b := clients["agentA"], clients["agentB"]
		sa, err := a.SubscribeSync(subjects.DeviceDesired(A))
		if err != nil {
			t.Fatal(err)
		}
		defer sa.Unsubscribe()
		sb, err := b.SubscribeSync(subjects.DeviceDesired(B))
		if err != nil {
			t.Fatal(err)
		}
		defer sb.Unsubscribe()
		for _, cl := range []*client{a, b} {
			if err := cl.Flush(); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := desired.Put(ctx, A, []byte("release-2")); err != nil {
			t.Fatal(err)
		}
		if _, err := desired.Put(ctx, B, []byte("release-3")); err != nil {
			t.Fatal(err)
		}
		m, err := sa.NextMsg(5 * time.Second)
		if err != nil || string(m.Data) != "release-2" {
			t.Fatalf("agent A: %v %v", m, err)
		}
		if m.Header.Get(jetstream.SubjectHeader) != subjects.KVKey(subjects.BucketDesired, A) {
			t.Errorf("republished from %s", m.Header.Get(jetstream.SubjectHeader))
		}
		// B's first notification is its own, not A's.
		m, err = sb.NextMsg(5 * time.Second)
		if err != nil || string(m.Data) != "release-3" {
			t.Fatalf("agent B: %v %v", m, err)
		}
	})

	t.Run("agent cannot roll up or purge the shared streams", func(t *testing.T) {
		a, b := clients["agentA"], clients["agentB"]
		ja, _ := jetstream.NewWithDomain(a.Conn, domain)
		jb, _ := jetstream.NewWithDomain(b.Conn, domain)
		ackB, err := jb.Publish(ctx, subjects.DeviceFacts(B), []byte(`{"b":1}`))
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range []string{"all", "sub"} {
			m := nats.NewMsg(subjects.DeviceFacts(A))
			m.Header.Set("Nats-Rollup", h)
			m.Data = []byte(`{"a":1}`)
			if _, err := ja.PublishMsg(ctx, m); err == nil {
				t.Errorf("agent published a %q rollup into %s", h, subjects.StreamFacts)
			}
		}
		m := nats.NewMsg(subjects.DeviceFacts(A))
		m.Header.Set("Nats-TTL", "1s")
		if _, err := ja.PublishMsg(ctx, m); err == nil {
			t.Error("agent set a per-message TTL")
		}
		facts, err := c.JetStream().Stream(ctx, subjects.StreamFacts)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := facts.GetLastMsgForSubject(ctx, subjects.DeviceFacts(B)); err != nil || got.Sequence != ackB.Sequence {
			t.Fatalf("device B's facts after A's rollup attempts: %v", err)
		}
	})

	t.Run("agent answers a command", func(t *testing.T) {
		a := clients["agentA"]
		s, err := a.Subscribe(subjects.DeviceCmd(A), func(m *nats.Msg) { _ = m.Respond([]byte("done")) })
		if err != nil {
			t.Fatal(err)
		}
		defer s.Unsubscribe()
		if err := a.Flush(); err != nil {
			t.Fatal(err)
		}
		m, err := coord.Request(subjects.DeviceCmd(A), []byte("reboot"), 5*time.Second)
		if err != nil || string(m.Data) != "done" {
			t.Fatalf("command reply: %v %v", m, err)
		}
	})

	t.Run("enroll request gets its reply", func(t *testing.T) {
		// The coordinator's enrollment service answers (here: refuses the
		// junk request); any answer proves the reply reached the bearer
		// user's own inbox.
		m, err := clients["enroll"].Request(subjects.Enroll, []byte("hello"), 5*time.Second)
		if err != nil || len(m.Data) == 0 {
			t.Fatalf("enroll reply: %v %v", m, err)
		}
		if !strings.HasPrefix(m.Subject, subjects.DeviceInboxPrefix(clients["enroll"].pub)+".") {
			t.Fatalf("reply delivered on %s", m.Subject)
		}
	})

	t.Run("owner uses buckets through the domain", func(t *testing.T) {
		j, err := jetstream.NewWithDomain(clients["owner"].Conn, domain)
		if err != nil {
			t.Fatal(err)
		}
		kv, err := j.KeyValue(ctx, subjects.BucketDevices)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kv.Put(ctx, "probe", []byte("x")); err != nil {
			t.Fatal(err)
		}
		if e, err := kv.Get(ctx, "probe"); err != nil || string(e.Value()) != "x" {
			t.Fatalf("get: %v", err)
		}
		if e, err := kv.Get(ctx, A); err == nil {
			t.Fatalf("unexpected device record %q", e.Value())
		}
	})

	t.Run("leaf user cannot connect as a client", func(t *testing.T) {
		cl, err := dial(url, creds["leaf"])
		if err == nil {
			cl.Close()
			t.Fatal("a leaf user connected as a plain client")
		}
		if !isAuthError(err) {
			t.Fatalf("want an authorization error, got %v", err)
		}
	})

	t.Run("forged credentials are refused", func(t *testing.T) {
		// A's JWT with B's key: the signature of the server's nonce fails.
		forged := &accounts.Creds{JWT: creds["agentA"].JWT, Key: creds["agentB"].Key}
		if cl, err := dial(url, forged); err == nil {
			cl.Close()
			t.Fatal("A's JWT with B's key connected")
		} else if !isAuthError(err) {
			t.Fatalf("want an authorization error, got %v", err)
		}
		// A non-bearer JWT without proof of the key.
		if cl, err := dialBearer(url, creds["agentA"]); err == nil {
			cl.Close()
			t.Fatal("an agent JWT connected without signing the nonce")
		} else if !isAuthError(err) {
			t.Fatalf("want an authorization error, got %v", err)
		}
		// A user of another fleet.
		other, err := accounts.Create(t.TempDir(), subjects.Domain, accounts.DefaultLimits)
		if err != nil {
			t.Fatal(err)
		}
		foreign, err := other.NewUser(subjects.RoleOwner, "intruder", 0)
		if err != nil {
			t.Fatal(err)
		}
		if cl, err := dial(url, foreign); err == nil {
			cl.Close()
			t.Fatal("an owner of another fleet connected")
		} else if !isAuthError(err) {
			t.Fatalf("want an authorization error, got %v", err)
		}
	})

	t.Run("a client without its inbox prefix cannot get replies", func(t *testing.T) {
		seed, _ := creds["agentA"].Key.Seed()
		errs := newAsyncErrs()
		nc, err := nats.Connect(url, nats.UserJWTAndSeed(creds["agentA"].JWT, string(seed)), nats.NoReconnect(),
			nats.ErrorHandler(errs.handler))
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		j, _ := jetstream.NewWithDomain(nc, domain)
		_, err = j.Publish(ctxT(t, 2*time.Second), subjects.DeviceFacts(A), []byte("{}"))
		if err == nil {
			t.Fatal("JetStream publish with the default _INBOX. prefix got its ack")
		}
		if !errors.Is(nc.LastError(), nats.ErrPermissionViolation) || !strings.Contains(nc.LastError().Error(), `Subscription to "_INBOX.`) {
			t.Fatalf("want a permissions violation on _INBOX., got %v / %v", err, nc.LastError())
		}
	})
}
