package broker

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"fleet/accounts"
	"fleet/model"
	"fleet/subjects"
)

// The role templates are enforced by the server itself: every case below
// is a real client over TCP against the embedded server, and a refusal is
// the server's permissions violation, not a check in our code.
func TestRoleTemplatesEnforcedByServer(t *testing.T) {
	c := startCoordinator(t, testConfig(t.TempDir()))
	auth := c.Authority()
	url := c.ClientURL()
	// The coordinator's FLEET connection: it sees what clients publish and
	// publishes the probes they may or may not receive.
	coord := c.ClientConn()
	ctx := ctxT(t, 60*time.Second)

	creds := map[string]*accounts.Creds{}
	for name, r := range map[string]subjects.Role{
		"agentA": subjects.RoleAgent, "agentB": subjects.RoleAgent, "pending": subjects.RolePending,
		"viewer": subjects.RoleViewer, "operator": subjects.RoleOperator, "owner": subjects.RoleOwner,
		"observer": subjects.RoleObserver, "enroll": subjects.RoleEnroll, "leaf": subjects.RoleLeaf,
	} {
		site := ""
		if r == subjects.RoleLeaf {
			site = "berlin"
		}
		kp := newKey(t)
		tok, err := auth.IssueSiteUser(r, pubOf(kp), name, site, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		creds[name] = &accounts.Creds{JWT: tok, Key: kp}
	}
	A, B, P := creds["agentA"].PublicKey(), creds["agentB"].PublicKey(), creds["pending"].PublicKey()
	hub := subjects.DefaultSite
	inboxA := subjects.DeviceInboxPrefix(hub, A)

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

	const (
		pub = "pub" // plain publish; the coordinator listens
		sub = "sub" // subscribe; the coordinator publishes probe
	)
	jsAPI := func(rest string) string { return subjects.JSAPIPrefix(c.Config().Domain) + rest }
	// The server maps a JetStream domain form to the local one before it
	// checks permissions, so a refusal may name either.
	forms := func(subj string) []string {
		if rest, ok := strings.CutPrefix(subj, subjects.JSAPIPrefix(c.Config().Domain)); ok {
			return []string{subj, subjects.JSAPIPrefix("") + rest}
		}
		return []string{subj}
	}
	cases := []struct {
		user, op, subj string
		probe          string // for sub: a literal subject the filter matches
		allow          bool
	}{
		// Agent of device A: sends its own reports and desired-state
		// requests, receives only its own inbox; nothing it can send, it
		// can also receive (no echo).
		{"agentA", pub, subjects.DeviceFacts(A), "", true},
		{"agentA", pub, subjects.DeviceEvents(A), "", true},
		{"agentA", pub, subjects.DesiredGetFor(A), "", true},
		{"agentA", sub, inboxA + ".>", subjects.DeviceNotify(hub, A), true},
		// The one wildcard a running agent holds for its triggers,
		// commands and kicks: its own, never another device's.
		{"agentA", sub, subjects.DeviceInboxLeaves(hub, A), subjects.DeviceCmd(hub, A), true},
		{"agentA", sub, subjects.DeviceInboxLeaves(hub, B), subjects.DeviceCmd(hub, B), false},
		{"agentA", pub, subjects.DevicePayloadsNotify(hub, B), "", false},
		{"agentA", pub, subjects.DeviceEscrowNotify(hub, A), "", false},
		{"agentA", pub, subjects.DeviceFacts(B), "", false},
		{"agentA", pub, subjects.DeviceEvents(B), "", false},
		{"agentA", pub, subjects.DesiredGetFor(B), "", false},
		{"agentA", pub, subjects.DeviceNotify(hub, B), "", false},
		{"agentA", pub, subjects.DeviceNotify(hub, A), "", false},
		{"agentA", pub, subjects.DeviceCmd(hub, A), "", false},
		{"agentA", pub, subjects.Enroll, "", false},
		{"agentA", pub, subjects.APIReadVerb("devices"), "", false},
		{"agentA", pub, "_INBOX.spoof", "", false},
		{"agentA", pub, jsAPI(".STREAM.DELETE." + subjects.StreamAudit), "", false},
		{"agentA", pub, "$JS.API.INFO", "", false},
		{"agentA", pub, subjects.KVKey(subjects.BucketAdmins, A), "", false},
		{"agentA", pub, subjects.KVKey(subjects.BucketGroups, "developers"), "", false},
		{"agentA", pub, subjects.APIWriteVerb(subjects.VerbDevicePin), "", false},
		{"agentA", pub, subjects.APIReadVerb(subjects.VerbDeployPreview), "", false},
		{"agentA", sub, subjects.DeviceFacts(A), "", false},
		{"agentA", sub, subjects.DesiredGetFor(A), "", false},
		{"agentA", sub, subjects.DeviceInboxPrefix(hub, B) + ".>", subjects.DeviceNotify(hub, B), false},
		{"agentA", sub, subjects.DeviceInboxPrefix("berlin", A) + ".>", subjects.DeviceNotify("berlin", A), false},
		{"agentA", sub, subjects.SiteInboxes(hub), subjects.DeviceNotify(hub, B), false},
		{"agentA", sub, ">", "fleet.probe", false},
		{"agentA", sub, "_INBOX.>", "_INBOX.probe", false},
		{"agentB", pub, subjects.DeviceFacts(B), "", true},
		{"agentB", pub, subjects.DeviceEvents(A), "", false},

		// Pending device: may only ask again whether it was approved.
		{"pending", pub, subjects.Enroll, "", true},
		{"pending", sub, subjects.DeviceInboxPrefix(hub, P) + ".>", subjects.DeviceInboxPrefix(hub, P) + ".x", true},
		{"pending", pub, subjects.DeviceFacts(P), "", false},
		{"pending", pub, subjects.DeviceEvents(P), "", false},
		{"pending", pub, subjects.DesiredGetFor(P), "", false},
		{"pending", sub, inboxA + ".>", subjects.DeviceNotify(hub, A), false},

		// Viewer: the API only (write verbs reach the coordinator, which
		// refuses and audits them).
		{"viewer", pub, subjects.APIReadVerb("devices"), "", true},
		{"viewer", pub, subjects.APIWriteVerb("deploy"), "", true},
		{"viewer", pub, jsAPI(".STREAM.INFO." + subjects.StreamFacts), "", false},
		{"viewer", pub, subjects.DeviceFacts(A), "", false},
		{"viewer", pub, subjects.DeviceCmd(hub, A), "", false},
		{"viewer", pub, subjects.Enroll, "", false},
		{"viewer", sub, inboxA + ".>", subjects.DeviceNotify(hub, A), false},
		{"viewer", sub, "_INBOX.>", "_INBOX.probe", false},
		{"viewer", sub, ">", "fleet.probe", false},

		// Operator: the same subjects; its role decides at the coordinator.
		{"operator", pub, subjects.APIWriteVerb("deploy"), "", true},
		{"operator", pub, subjects.DeviceCmd(hub, A), "", false},
		{"operator", pub, jsAPI(".STREAM.DELETE." + subjects.StreamFacts), "", false},
		{"operator", sub, "_INBOX.>", "_INBOX.probe", false},

		// Observer: a few read verbs.
		{"observer", pub, subjects.APIReadVerb("devices"), "", true},
		{"observer", pub, subjects.APIReadVerb("facts"), "", true},
		{"observer", pub, subjects.APIReadVerb("tokens"), "", false},
		{"observer", pub, subjects.APIWriteVerb("deploy"), "", false},
		{"observer", pub, subjects.APIReadVerb(subjects.VerbGroups), "", false},
		{"observer", pub, subjects.APIReadVerb(subjects.VerbDeployPreview), "", false},
		{"observer", pub, subjects.APIWriteVerb(subjects.VerbDevicePin), "", false},
		{"observer", sub, "_INBOX.>", "_INBOX.probe", false},

		// Enroll: a bearer credential for fleet.enroll only.
		{"enroll", pub, subjects.Enroll, "", true},
		{"enroll", pub, subjects.APIReadVerb("devices"), "", false},
		{"enroll", pub, subjects.DeviceFacts(A), "", false},
		{"enroll", pub, subjects.DesiredGetFor(A), "", false},
		{"enroll", sub, inboxA + ".>", subjects.DeviceNotify(hub, A), false},
		{"enroll", sub, "_INBOX.>", "_INBOX.probe", false},

		// Owner: the API, like every admin; never device subjects, the
		// state, or other users' replies.
		{"owner", pub, subjects.APIWriteVerb("tokens"), "", true},
		{"owner", pub, subjects.DeviceCmd(hub, A), "", false},
		{"owner", pub, subjects.DeviceFacts(B), "", false},
		{"owner", pub, subjects.AuditSubject("test"), "", false},
		{"owner", pub, jsAPI(".STREAM.DELETE." + subjects.StreamAudit), "", false},
		{"owner", pub, subjects.KVKey(subjects.BucketAdmins, A), "", false},
		{"owner", sub, "fleet.>", subjects.DeviceFacts(A), false},
		{"owner", sub, "_INBOX.>", "_INBOX.probe", false},
		{"owner", sub, ">", "$JS.EVENT.probe", false},
		{"owner", sub, inboxA + ".>", subjects.DeviceNotify(hub, A), false},
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
					if err := cl.errs.violation("Publish", tc.subj); err != nil {
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
			default:
				t.Fatalf("unknown op %s", tc.op)
			}
		})
	}

	t.Run("agent gets its desired state, in its own inbox, when it changes", func(t *testing.T) {
		desired, err := c.JetStream().KeyValue(ctx, subjects.BucketDesired)
		if err != nil {
			t.Fatal(err)
		}
		// Triggers go to recorded, active devices only.
		for _, id := range []string{A, B} {
			recordDevice(t, c, id, hub)
		}
		a, b := clients["agentA"], clients["agentB"]
		sa, err := a.SubscribeSync(subjects.DeviceNotify(hub, A))
		if err != nil {
			t.Fatal(err)
		}
		defer sa.Unsubscribe()
		sb, err := b.SubscribeSync(subjects.DeviceNotify(hub, B))
		if err != nil {
			t.Fatal(err)
		}
		defer sb.Unsubscribe()
		for _, cl := range []*client{a, b} {
			if err := cl.Flush(); err != nil {
				t.Fatal(err)
			}
		}
		// As the rollout engine does: write (marked as announced by the
		// engine, so no bare trigger goes out too), then announce.
		valA := []byte(`{"release_id":"secret-release-of-A"}`)
		ack, err := c.JetStream().PublishMsg(ctx, &nats.Msg{Subject: subjects.KVKey(subjects.BucketDesired, A), Data: valA, Header: announcedHeader})
		if err != nil {
			t.Fatal(err)
		}
		c.svc.announce([]announcement{{id: A, site: hub, seq: ack.Sequence, value: valA}})
		m, err := sa.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("agent A got no trigger: %v", err)
		}
		// The trigger carries A's new state, as a read would, and nothing
		// from the server's internals (no headers).
		var trig model.DesiredReply
		if err := json.Unmarshal(m.Data, &trig); err != nil || trig.Seq == 0 || !strings.Contains(string(trig.Desired), "secret-release-of-A") || len(m.Header) != 0 {
			t.Fatalf("A's trigger carries data %q / headers %v; want A's desired state and its sequence", m.Data, m.Header)
		}
		// Any other write: a bare trigger, the device reads its state.
		if _, err := desired.Put(ctx, B, []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
		// B's first trigger is its own change; A's change never reached B.
		mb, err := sb.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("agent B: %v", err)
		}
		if strings.Contains(string(mb.Data), "secret-release-of-A") {
			t.Fatalf("B's trigger carries A's state: %s", mb.Data)
		}
		if n, _, _ := sb.Pending(); n != 0 {
			t.Fatalf("agent B got %d more triggers", n)
		}
	})

	t.Run("agent cannot answer a request: no role has allow_responses", func(t *testing.T) {
		a := clients["agentA"]
		owner := clients["owner"]
		reply := creds["owner"].InboxPrefix() + ".probe"
		got, err := owner.SubscribeSync(reply)
		if err != nil {
			t.Fatal(err)
		}
		defer got.Unsubscribe()
		if err := owner.Flush(); err != nil {
			t.Fatal(err)
		}
		s, err := a.Subscribe(subjects.DeviceCmd(hub, A), func(m *nats.Msg) { _ = m.Respond([]byte("echo")) })
		if err != nil {
			t.Fatal(err)
		}
		defer s.Unsubscribe()
		if err := a.Flush(); err != nil {
			t.Fatal(err)
		}
		if err := coord.PublishRequest(subjects.DeviceCmd(hub, A), reply, []byte("reboot")); err != nil {
			t.Fatal(err)
		}
		a.errs.waitViolation(t, 5*time.Second, "Publish", reply)
		if err := owner.Flush(); err != nil {
			t.Fatal(err)
		}
		if n, _, _ := got.Pending(); n != 0 {
			t.Fatal("the device's answer reached the reply subject")
		}
	})

	t.Run("enroll request gets its reply in the bearer's own inbox", func(t *testing.T) {
		// The coordinator's enrollment service answers (here: refuses the
		// junk request); any answer proves the reply reached the bearer
		// user's own inbox.
		m, err := clients["enroll"].Request(subjects.Enroll, []byte("hello"), 5*time.Second)
		if err != nil || len(m.Data) == 0 {
			t.Fatalf("enroll reply: %v %v", m, err)
		}
		if !strings.HasPrefix(m.Subject, subjects.DeviceInboxPrefix(hub, clients["enroll"].pub)+".") {
			t.Fatalf("reply delivered on %s", m.Subject)
		}
	})

	t.Run("no client reaches JetStream", func(t *testing.T) {
		// FLEET has no JetStream and no imports: even the owner's
		// JetStream calls find nothing to answer them.
		for _, name := range []string{"owner", "agentA"} {
			j, err := jetstream.NewWithDomain(clients[name].Conn, c.Config().Domain)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := j.KeyValue(ctxT(t, 3*time.Second), subjects.BucketAdmins); err == nil {
				t.Fatalf("%s opened %s", name, subjects.BucketAdmins)
			}
			j, _ = jetstream.New(clients[name].Conn)
			if _, err := j.AccountInfo(ctxT(t, 3*time.Second)); err == nil {
				t.Fatalf("%s reached a JetStream API", name)
			}
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
		if _, err := nc.Request(subjects.DesiredGetFor(A), nil, 2*time.Second); err == nil {
			t.Fatal("a request with the default _INBOX. prefix got its answer")
		}
		if !errors.Is(nc.LastError(), nats.ErrPermissionViolation) || !strings.Contains(nc.LastError().Error(), `Subscription to "_INBOX.`) {
			t.Fatalf("want a permissions violation on _INBOX., got %v", nc.LastError())
		}
	})
}
