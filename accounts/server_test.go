package accounts

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"fleet/internal/poll"
	"fleet/subjects"
)

// The tests in this file run the JWTs of an Authority in a real
// nats-server: the role templates, with {{subject()}} and {{tag(site)}}
// filled in by the server, are what hold clients to their own subjects.

// serverLimits are small enough for any test machine's disk.
var serverLimits = Limits{Connections: -1, MaxPayload: 1 << 20, JetStreamDisk: 64 << 20, JetStreamMemory: 16 << 20}

// resolver holds the account JWTs a server of this fleet preloads: the
// hub all three, a site's leaf node SYS and FLEET.
func resolver(t *testing.T, a *Authority, core bool) *server.MemAccResolver {
	t.Helper()
	sys, fleet, err := a.AccountJWTs()
	if err != nil {
		t.Fatal(err)
	}
	res := &server.MemAccResolver{}
	jwts := map[string]string{a.SystemAccount(): sys, a.FleetAccount(): fleet}
	if core {
		c, err := a.CoreJWT()
		if err != nil {
			t.Fatal(err)
		}
		jwts[a.CoreAccount()] = c
	}
	for acc, tok := range jwts {
		if err := res.Store(acc, tok); err != nil {
			t.Fatal(err)
		}
	}
	return res
}

func runServer(t *testing.T, opts *server.Options) *server.Server {
	t.Helper()
	opts.Host = "127.0.0.1"
	opts.Port = server.RANDOM_PORT
	opts.NoSigs, opts.NoLog = true, true
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	return s
}

// startHub runs the coordinator's server the way broker configures it:
// operator mode, JetStream in the fleet's domain, a leaf node listener.
func startHub(t *testing.T, a *Authority) *server.Server {
	t.Helper()
	oc, err := jwt.DecodeOperatorClaims(a.OperatorJWT)
	if err != nil {
		t.Fatal(err)
	}
	return runServer(t, &server.Options{
		ServerName:       "hub",
		JetStream:        true,
		JetStreamDomain:  subjects.Domain,
		StoreDir:         t.TempDir(),
		TrustedOperators: []*jwt.OperatorClaims{oc},
		SystemAccount:    a.SystemAccount(),
		AccountResolver:  resolver(t, a, true),
		LeafNode:         server.LeafNodeOpts{Host: "127.0.0.1", Port: server.RANDOM_PORT},
	})
}

// startSite runs a site's leaf node with the leaf credential cr.
func startSite(t *testing.T, a *Authority, hub *server.Server, cr *Creds) *server.Server {
	t.Helper()
	oc, err := jwt.DecodeOperatorClaims(a.OperatorJWT)
	if err != nil {
		t.Fatal(err)
	}
	credsPath := filepath.Join(t.TempDir(), "leaf.creds")
	if err := WriteCreds(credsPath, cr); err != nil {
		t.Fatal(err)
	}
	vz, err := hub.Varz(nil)
	if err != nil {
		t.Fatal(err)
	}
	hubURL, err := url.Parse("nats-leaf://127.0.0.1:" + strconv.Itoa(vz.LeafNode.Port))
	if err != nil {
		t.Fatal(err)
	}
	ls := runServer(t, &server.Options{
		ServerName:       "site",
		TrustedOperators: []*jwt.OperatorClaims{oc},
		SystemAccount:    a.SystemAccount(),
		AccountResolver:  resolver(t, a, false),
		LeafNode: server.LeafNodeOpts{Remotes: []*server.RemoteLeafOpts{{
			URLs: []*url.URL{hubURL}, Credentials: credsPath, LocalAccount: a.FleetAccount(),
		}}},
	})
	poll.Until(t, 10*time.Second, "the site's leaf link", func() bool {
		return ls.NumLeafNodes() == 1 && hub.NumLeafNodes() == 1
	})
	return ls
}

// conn is a client connection that checks its permissions against the
// server's answers.
type conn struct {
	*nats.Conn
	name string
}

func connect(url string, cr *Creds, bearer bool) (*nats.Conn, error) {
	return nats.Connect(url,
		nats.UserJWT(
			func() (string, error) { return cr.JWT, nil },
			func(nonce []byte) ([]byte, error) {
				if bearer {
					return nil, nil
				}
				return cr.Key.Sign(nonce)
			}),
		nats.CustomInboxPrefix(cr.InboxPrefix()),
		// Refusals are checked through LastError, not logged.
		nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {}),
		nats.NoReconnect(),
		nats.Timeout(5*time.Second))
}

func dial(t *testing.T, url, name string, cr *Creds) *conn {
	t.Helper()
	nc, err := connect(url, cr, false)
	if err != nil {
		t.Fatalf("connect as %s: %v", name, err)
	}
	t.Cleanup(nc.Close)
	return &conn{nc, name}
}

// violated reports whether the server refused op ("Publish" or
// "Subscription") to subj, after a round trip that made it answer. The
// server reports a refusal before it answers the PING, and the client
// records it before it takes the PONG, so no waiting is involved.
func (c *conn) violated(t *testing.T, op, subj string) bool {
	t.Helper()
	if err := c.Flush(); err != nil {
		t.Fatalf("%s: flush: %v", c.name, err)
	}
	err := c.LastError()
	return errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), fmt.Sprintf("%s to %q", op, subj))
}

// watch subscribes subj as w and makes sure the server has the interest.
func (w *conn) watch(t *testing.T, subj string) *nats.Subscription {
	t.Helper()
	s, err := w.SubscribeSync(subj)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Unsubscribe() })
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	return s
}

// none checks that s got nothing: w's round trip comes after every
// message the server delivered to it before.
func (w *conn) none(t *testing.T, s *nats.Subscription, what string) {
	t.Helper()
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if n, _, _ := s.Pending(); n != 0 {
		m, _ := s.NextMsg(0)
		t.Errorf("%s reached %s: %v", what, w.name, m.Subject)
	}
}

// mayPublish checks that c may send subj: w, watching it, receives it.
func (c *conn) mayPublish(t *testing.T, w *conn, subjs ...string) {
	t.Helper()
	for _, subj := range subjs {
		s := w.watch(t, subj)
		if err := c.Publish(subj, []byte("x")); err != nil {
			t.Fatal(err)
		}
		if c.violated(t, "Publish", subj) {
			t.Errorf("%s may not publish %s", c.name, subj)
			continue
		}
		if _, err := s.NextMsg(5 * time.Second); err != nil {
			t.Errorf("%s published %s, but it did not arrive: %v", c.name, subj, err)
		}
	}
}

// mayNotPublish checks that the server refuses subj from c, and that w,
// watching it, receives nothing.
func (c *conn) mayNotPublish(t *testing.T, w *conn, subjs ...string) {
	t.Helper()
	for _, subj := range subjs {
		s := w.watch(t, subj)
		if err := c.Publish(subj, []byte("x")); err != nil {
			t.Fatal(err)
		}
		if !c.violated(t, "Publish", subj) {
			t.Errorf("%s may publish %s", c.name, subj)
		}
		w.none(t, s, c.name+"'s "+subj)
	}
}

// maySubscribe checks that c may subscribe filter and receives literal,
// sent by w.
func (c *conn) maySubscribe(t *testing.T, w *conn, filter, literal string) {
	t.Helper()
	s, err := c.SubscribeSync(filter)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Unsubscribe()
	if c.violated(t, "Subscription", filter) {
		t.Errorf("%s may not subscribe %s", c.name, filter)
		return
	}
	if err := w.Publish(literal, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.NextMsg(5 * time.Second); err != nil {
		t.Errorf("%s subscribed %s, but %s did not arrive: %v", c.name, filter, literal, err)
	}
}

// mayNotSubscribe checks that the server refuses c's subscriptions.
func (c *conn) mayNotSubscribe(t *testing.T, filters ...string) {
	t.Helper()
	for _, f := range filters {
		s, err := c.SubscribeSync(f)
		if err != nil {
			t.Fatal(err)
		}
		if !c.violated(t, "Subscription", f) {
			t.Errorf("%s may subscribe %s", c.name, f)
		}
		_ = s.Unsubscribe()
	}
}

// siteUser issues a user of role r at site with a fresh key.
func siteUser(t *testing.T, a *Authority, r subjects.Role, site string) *Creds {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	tok, err := a.IssueSiteUser(r, mustPub(kp), string(r)+"@"+site, site, 0)
	if err != nil {
		t.Fatal(err)
	}
	return &Creds{JWT: tok, Key: kp}
}

func TestAccountsOnServer(t *testing.T) {
	_, a := createWith(t, serverLimits)
	hub := startHub(t, a)
	url := hub.ClientURL()
	svcCreds, err := a.ServiceUser("svc")
	if err != nil {
		t.Fatal(err)
	}
	svc := dial(t, url, "the FLEET service user", svcCreds)
	coreCreds, err := a.CoreUser("core")
	if err != nil {
		t.Fatal(err)
	}
	core := dial(t, url, "the CORE user", coreCreds)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// CORE stores, within its limits; FLEET has no JetStream at all.
	cjs, err := jetstream.New(core.Conn)
	if err != nil {
		t.Fatal(err)
	}
	info, err := cjs.AccountInfo(ctx)
	if err != nil {
		t.Fatalf("CORE JetStream: %v", err)
	}
	if info.Limits.MaxStore != serverLimits.JetStreamDisk || info.Limits.MaxMemory != serverLimits.JetStreamMemory {
		t.Errorf("CORE JetStream limits %+v, want disk %d memory %d", info.Limits, serverLimits.JetStreamDisk, serverLimits.JetStreamMemory)
	}
	fjs, err := jetstream.New(svc.Conn)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fjs.AccountInfo(ctx); !errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) && !errors.Is(err, jetstream.ErrJetStreamNotEnabled) {
		t.Errorf("FLEET JetStream: %v, want not enabled", err)
	}

	// The accounts share nothing: what a client sends in FLEET never
	// reaches CORE, and what CORE's users send never reaches FLEET.
	dev := siteUser(t, a, subjects.RoleAgent, "")
	agent := dial(t, url, "agent", dev)
	inCore := core.watch(t, subjects.DeviceFacts(dev.PublicKey()))
	agent.mayPublish(t, svc, subjects.DeviceFacts(dev.PublicKey()))
	core.none(t, inCore, "a FLEET client's facts")
	core.mayNotPublishTo(t, svc, subjects.DeviceCmd(subjects.DefaultSite, dev.PublicKey()))

	t.Run("agent", func(t *testing.T) {
		id := dev.PublicKey()
		other := siteUser(t, a, subjects.RoleAgent, "").PublicKey()
		agent.mayPublish(t, svc, subjects.DeviceEvents(id), subjects.DesiredGetFor(id))
		agent.mayNotPublish(t, svc,
			subjects.DeviceFacts(other), subjects.DeviceEvents(other), subjects.DesiredGetFor(other),
			subjects.DeviceDesired(id), subjects.DeviceNotify(subjects.DefaultSite, other), subjects.DeviceCmd(subjects.DefaultSite, id),
			subjects.Enroll, subjects.APIReadVerb(subjects.VerbDevices), "$JS.API.INFO")
		agent.maySubscribe(t, svc, subjects.DeviceNotify(subjects.DefaultSite, id), subjects.DeviceNotify(subjects.DefaultSite, id))
		agent.maySubscribe(t, svc, subjects.DeviceInboxPrefix(subjects.DefaultSite, id)+".>", subjects.DeviceCmd(subjects.DefaultSite, id))
		agent.mayNotSubscribe(t, "_INBOX.>", ">", subjects.DeviceInboxPrefix(subjects.DefaultSite, other)+".>",
			subjects.DeviceInboxPrefix("berlin", id)+".>", subjects.SiteInboxes(subjects.DefaultSite),
			subjects.InboxPrefix(id)+".>", subjects.AllFacts, subjects.Enroll)

		// Its own requests are answered into its own inbox.
		s, err := svc.Subscribe(subjects.DesiredGetFor(id), func(m *nats.Msg) { _ = m.Respond([]byte("desired")) })
		if err != nil {
			t.Fatal(err)
		}
		defer s.Unsubscribe()
		if err := svc.Flush(); err != nil {
			t.Fatal(err)
		}
		if m, err := agent.Request(subjects.DesiredGetFor(id), nil, 5*time.Second); err != nil || string(m.Data) != "desired" {
			t.Errorf("desired get through the agent's own inbox: %v", err)
		}

		// No role answers requests: a reply subject handed to the agent
		// is not one it may publish to.
		reply := subjects.InboxPrefix(svcCreds.PublicKey()) + ".r1"
		replies := svc.watch(t, reply)
		cmds := agent.watch(t, subjects.DeviceCmd(subjects.DefaultSite, id)+".x")
		if err := svc.PublishRequest(subjects.DeviceCmd(subjects.DefaultSite, id)+".x", reply, []byte("cmd")); err != nil {
			t.Fatal(err)
		}
		m, err := cmds.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Respond([]byte("done")); err != nil {
			t.Fatal(err)
		}
		if !agent.violated(t, "Publish", reply) {
			t.Error("the agent may answer a request")
		}
		svc.none(t, replies, "the agent's answer")

		// A device needs a handful of subscriptions, not more.
		n := roleLimits(t, a, subjects.RoleAgent).Subs
		if n <= 0 {
			t.Fatalf("agent subscriptions unbounded (%d)", n)
		}
		fresh := dial(t, url, "agent (fresh)", dev)
		for i := range n {
			if _, err := fresh.SubscribeSync(subjects.DeviceInboxPrefix(subjects.DefaultSite, id) + ".s" + strconv.Itoa(int(i))); err != nil {
				t.Fatal(err)
			}
		}
		if err := fresh.Flush(); err != nil || fresh.LastError() != nil {
			t.Fatalf("%d subscriptions: %v %v", n, err, fresh.LastError())
		}
		if _, err := fresh.SubscribeSync(subjects.DeviceInboxPrefix(subjects.DefaultSite, id) + ".one-more"); err != nil {
			t.Fatal(err)
		}
		if err := fresh.Flush(); err != nil {
			t.Fatal(err)
		}
		if !errors.Is(fresh.LastError(), nats.ErrMaxSubscriptionsExceeded) {
			t.Errorf("subscription %d: %v, want the limit", n+1, fresh.LastError())
		}

		// The key must be proven: the agent's JWT alone is refused.
		if nc, err := connect(url, dev, true); err == nil {
			nc.Close()
			t.Error("an agent connected without proving its key")
		}
	})

	t.Run("agent at a site", func(t *testing.T) {
		cr := siteUser(t, a, subjects.RoleAgent, "berlin")
		id := cr.PublicKey()
		c := dial(t, url, "agent@berlin", cr)
		c.maySubscribe(t, svc, subjects.DeviceInboxPrefix("berlin", id)+".>", subjects.DeviceNotify("berlin", id))
		c.mayNotSubscribe(t, subjects.DeviceNotify(subjects.DefaultSite, id), subjects.DeviceInboxPrefix(subjects.DefaultSite, id)+".>",
			subjects.SiteInboxes("berlin"))
		c.mayPublish(t, svc, subjects.DeviceFacts(id))
	})

	t.Run("pending and enroll", func(t *testing.T) {
		p := siteUser(t, a, subjects.RolePending, "")
		pc := dial(t, url, "pending", p)
		pc.mayPublish(t, svc, subjects.Enroll)
		pc.mayNotPublish(t, svc, subjects.DeviceFacts(p.PublicKey()), subjects.DesiredGetFor(p.PublicKey()))
		pc.maySubscribe(t, svc, subjects.DeviceInboxPrefix(subjects.DefaultSite, p.PublicKey())+".>", subjects.DeviceInboxPrefix(subjects.DefaultSite, p.PublicKey())+".r")

		// The bearer connects with its JWT alone.
		e := siteUser(t, a, subjects.RoleEnroll, "berlin")
		nc, err := connect(url, e, true)
		if err != nil {
			t.Fatalf("enroll bearer: %v", err)
		}
		defer nc.Close()
		ec := &conn{nc, "enroll"}
		ec.mayPublish(t, svc, subjects.Enroll)
		ec.mayNotPublish(t, svc, subjects.DeviceFacts(e.PublicKey()), subjects.APIReadVerb(subjects.VerbDevices))
		ec.mayNotSubscribe(t, subjects.DeviceInboxPrefix(subjects.DefaultSite, e.PublicKey())+".>", subjects.Enroll)
		ec.maySubscribe(t, svc, subjects.DeviceInboxPrefix("berlin", e.PublicKey())+".>", subjects.DeviceInboxPrefix("berlin", e.PublicKey())+".r")
	})

	t.Run("admins", func(t *testing.T) {
		dev := siteUser(t, a, subjects.RoleAgent, "").PublicKey()
		for _, r := range subjects.AdminRoles {
			cr := siteUser(t, a, r, "")
			c := dial(t, url, string(r), cr)
			c.mayPublish(t, svc, subjects.APIReadVerb(subjects.VerbDevices))
			if r != subjects.RoleObserver {
				c.mayPublish(t, svc, subjects.APIWriteVerb(subjects.VerbDeploy))
			} else {
				c.mayNotPublish(t, svc, subjects.APIReadVerb(subjects.VerbTokens), subjects.APIWriteVerb(subjects.VerbDeploy))
			}
			c.mayNotPublish(t, svc, subjects.Enroll, subjects.DesiredGetFor(dev), subjects.DeviceCmd(subjects.DefaultSite, dev)+".a")
			c.maySubscribe(t, svc, subjects.InboxPrefix(cr.PublicKey())+".>", subjects.InboxPrefix(cr.PublicKey())+".r")
			c.mayNotSubscribe(t, "_INBOX.>", subjects.DeviceInboxPrefix(subjects.DefaultSite, dev)+".>",
				subjects.InboxPrefix(dev)+".>", subjects.APIRead+".>")
		}
	})

	t.Run("leaf credential is no client", func(t *testing.T) {
		if nc, err := connect(url, siteUser(t, a, subjects.RoleLeaf, "berlin"), false); err == nil {
			nc.Close()
			t.Error("a leaf credential connected as a client")
		}
	})
}

// mayNotPublishTo checks that c's message on subj does not reach w: c may
// send it in its own account, but w is in another.
func (c *conn) mayNotPublishTo(t *testing.T, w *conn, subj string) {
	t.Helper()
	s := w.watch(t, subj)
	if err := c.Publish(subj, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	w.none(t, s, c.name+"'s "+subj)
}

// roleLimits is the limits of role r's scope in the FLEET account JWT.
func roleLimits(t *testing.T, a *Authority, r subjects.Role) jwt.NatsLimits {
	t.Helper()
	_, fleet, err := a.AccountJWTs()
	if err != nil {
		t.Fatal(err)
	}
	fc, err := jwt.DecodeAccountClaims(fleet)
	if err != nil {
		t.Fatal(err)
	}
	sk, ok := fc.SigningKeys.GetScope(a.RoleKey(r))
	if !ok {
		t.Fatalf("no scope for %s", r)
	}
	return sk.(*jwt.UserScope).Template.Limits.NatsLimits
}

// A site's leaf link carries its devices' requests into the hub and its
// own devices' inboxes back, nothing else: no other site's replies, no
// admin's, and from the site no triggers, commands, inboxes or API.
func TestLeafLinkOnServer(t *testing.T) {
	_, a := createWith(t, serverLimits)
	hub := startHub(t, a)
	site := startSite(t, a, hub, siteUser(t, a, subjects.RoleLeaf, "berlin"))
	svcCreds, err := a.ServiceUser("svc")
	if err != nil {
		t.Fatal(err)
	}
	atHub := dial(t, hub.ClientURL(), "the hub", svcCreds)
	atSite := dial(t, site.ClientURL(), "the site", svcCreds)
	hubAcc, err := hub.LookupAccount(a.FleetAccount())
	if err != nil {
		t.Fatal(err)
	}
	siteAcc, err := site.LookupAccount(a.FleetAccount())
	if err != nil {
		t.Fatal(err)
	}
	dev := siteUser(t, a, subjects.RoleAgent, "berlin").PublicKey()
	admin := siteUser(t, a, subjects.RoleOwner, "").PublicKey()

	// Hub to site: of everything the site listens to, only its own
	// devices' inboxes arrive. The allowed message goes last over the
	// same link, so whatever was let through before it arrived first.
	all := atSite.watch(t, ">")
	last := subjects.DeviceNotify("berlin", dev)
	poll.Until(t, 10*time.Second, "the site's interest at the hub", func() bool { return hubAcc.SubscriptionInterest(last) })
	for _, subj := range []string{
		subjects.DeviceNotify(subjects.DefaultSite, dev), subjects.DeviceCmd(subjects.DefaultSite, dev),
		subjects.DeviceNotify("paris", dev), subjects.DeviceInboxPrefix("paris", dev) + ".r",
		subjects.InboxPrefix(admin) + ".r", "_INBOX.r", subjects.Enroll, subjects.DeviceFacts(dev),
		subjects.DesiredGetFor(dev), subjects.DeviceDesired(dev), subjects.APIReadVerb(subjects.VerbDevices),
		subjects.DeviceCmd("berlin", dev), last,
	} {
		if err := atHub.Publish(subj, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if err := atHub.Flush(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for len(got) == 0 || got[len(got)-1] != last {
		m, err := all.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("the site got %v, and then nothing: %v", got, err)
		}
		got = append(got, m.Subject)
	}
	if want := []string{subjects.DeviceCmd("berlin", dev), last}; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("the site received %v, want only %v", got, want)
	}

	// Site to hub: only facts, events, desired gets and enrollment. The
	// site's own interest goes first, so the interest seen there next is
	// the hub's.
	if err := all.Unsubscribe(); err != nil {
		t.Fatal(err)
	}
	if err := atSite.Flush(); err != nil {
		t.Fatal(err)
	}
	if siteAcc.SubscriptionInterest(subjects.DeviceFacts(dev)) {
		t.Fatal("the site still has interest of its own")
	}
	toHub := atHub.watch(t, ">")
	lastUp := subjects.DeviceFacts(dev)
	poll.Until(t, 10*time.Second, "the hub's interest at the site", func() bool { return siteAcc.SubscriptionInterest(lastUp) })
	for _, subj := range []string{
		subjects.DeviceDesired(dev), subjects.DeviceNotify("berlin", dev), subjects.DeviceCmd("berlin", dev),
		subjects.DeviceNotify(subjects.DefaultSite, dev), subjects.DeviceInboxPrefix(subjects.DefaultSite, dev) + ".r",
		subjects.InboxPrefix(admin) + ".r", "_INBOX.r", subjects.APIReadVerb(subjects.VerbDevices),
		subjects.APIWriteVerb(subjects.VerbDeploy), subjects.AuditSubject(subjects.VerbDeploy), "$JS.API.INFO",
		subjects.AccountConnect(a.FleetAccount()),
		subjects.Enroll, subjects.DesiredGetFor(dev), subjects.DeviceEvents(dev), lastUp,
	} {
		if err := atSite.Publish(subj, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if err := atSite.Flush(); err != nil {
		t.Fatal(err)
	}
	got = nil
	for len(got) == 0 || got[len(got)-1] != lastUp {
		m, err := toHub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("the hub got %v, and then nothing: %v", got, err)
		}
		got = append(got, m.Subject)
	}
	want := []string{subjects.Enroll, subjects.DesiredGetFor(dev), subjects.DeviceEvents(dev), lastUp}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("the hub received %v from the site, want only %v", got, want)
	}
}
