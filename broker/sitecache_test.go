package broker

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/admin"
	"fleet/agent"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// siteWorld is a cache world whose coordinator listens for leaf nodes, and
// a site "berlin" set up with a copy of the cache.
type siteWorld struct {
	*cacheWorld
	*testSite
}

// testSite is a site set up with leaf config --cache: its answer and the
// creds of its two links (coreCreds: its cache link's).
type testSite struct {
	name      string
	lc        model.LeafConfig
	leafCreds string
	coreCreds string
}

func newSiteWorld(t *testing.T) *siteWorld {
	t.Helper()
	dir := t.TempDir()
	cfg := testConfig(dir)
	cfg.LeafnodeListen = "127.0.0.1:0"
	c := startCoordinator(t, cfg)
	w := &cacheWorld{t: t, c: c, stage: t.TempDir()}
	owner, err := admin.Dial(ctxT(t, 10*time.Second), c.ClientURL(), filepath.Join(dir, accounts.AdminCredsFile))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(owner.Close)
	w.owner = owner
	sw := &siteWorld{cacheWorld: w}
	sw.testSite = sw.addSite("berlin")
	return sw
}

// addSite runs leaf config --cache for site and writes its two creds.
func (sw *siteWorld) addSite(site string) *testSite {
	t := sw.t
	lk, ck := newKey(t), newKey(t)
	ts := &testSite{name: site}
	if err := sw.owner.Call(ctxT(t, 10*time.Second), subjects.VerbLeafConfig, true, model.LeafConfigRequest{
		Site: site, Key: pubOf(lk),
		Cache: &model.SiteCache{Key: pubOf(ck), MaxBytes: 1 << 30, MaxAge: model.Duration(24 * time.Hour)},
	}, &ts.lc); err != nil {
		t.Fatal(err)
	}
	if ts.lc.CacheUserJWT == "" || ts.lc.CoreJWT == "" {
		t.Fatalf("leaf config without the cache link: %+v", ts.lc)
	}
	ts.leafCreds = filepath.Join(t.TempDir(), "leaf.creds")
	ts.coreCreds = filepath.Join(t.TempDir(), "leaf-cache.creds")
	if err := accounts.WriteCreds(ts.leafCreds, &accounts.Creds{JWT: ts.lc.JWT, Key: lk}); err != nil {
		t.Fatal(err)
	}
	if err := accounts.WriteCreds(ts.coreCreds, &accounts.Creds{JWT: ts.lc.CacheUserJWT, Key: ck}); err != nil {
		t.Fatal(err)
	}
	return ts
}

// startSite runs berlin's leaf node as leaf config --cache describes it:
// operator mode, JetStream in domain berlin, a FLEET link and a cache link
// from its CORE (SITELINK at the hub) that feeds the mirrors (with cache
// false, without the cache link and JetStream: a site with no copy).
func (sw *siteWorld) startSite(cache bool) *server.Server {
	return sw.startSiteOf(sw.testSite, cache, false)
}

// startSiteOf runs ts's leaf node as startSite does; lax turns JetStream's
// strict checking of API requests off (jetstream { strict: false }).
func (sw *siteWorld) startSiteOf(ts *testSite, cache, lax bool) *server.Server {
	t := sw.t
	auth := sw.c.Authority()
	oc, err := jwt.DecodeOperatorClaims(auth.OperatorJWT)
	if err != nil {
		t.Fatal(err)
	}
	res := &server.MemAccResolver{}
	for acc, tok := range map[string]string{ts.lc.SystemAccount: ts.lc.SystemJWT, ts.lc.FleetAccount: ts.lc.FleetJWT, ts.lc.CoreAccount: ts.lc.CoreJWT} {
		if err := res.Store(acc, tok); err != nil {
			t.Fatal(err)
		}
	}
	hub, err := url.Parse(sw.c.LeafURL())
	if err != nil {
		t.Fatal(err)
	}
	opts := &server.Options{
		ServerName: "leaf-" + ts.name, Host: "127.0.0.1", Port: server.RANDOM_PORT, NoSigs: true, NoLog: !testing.Verbose(), Debug: testing.Verbose(),
		TrustedOperators: []*jwt.OperatorClaims{oc}, SystemAccount: auth.SystemAccount(), AccountResolver: res,
		LeafNode: server.LeafNodeOpts{Remotes: []*server.RemoteLeafOpts{{URLs: []*url.URL{hub}, Credentials: ts.leafCreds, LocalAccount: auth.FleetAccount()}}},
	}
	if cache {
		opts.JetStream, opts.JetStreamDomain, opts.StoreDir = true, ts.name, t.TempDir()
		opts.NoJetStreamStrict = lax
		opts.LeafNode.Remotes = append(opts.LeafNode.Remotes, &server.RemoteLeafOpts{URLs: []*url.URL{hub}, Credentials: ts.coreCreds, LocalAccount: auth.CoreAccount()})
	}
	ls, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	if testing.Verbose() {
		ls.ConfigureLogger()
	}
	ls.Start()
	t.Cleanup(func() {
		ls.Shutdown()
		ls.WaitForShutdown()
	})
	if !ls.ReadyForConnections(10 * time.Second) {
		t.Fatal("leaf server not ready")
	}
	want := 1
	if cache {
		want = 2
	}
	poll.Until(t, 10*time.Second, "leaf links to the coordinator", func() bool {
		return ls.NumLeafNodes() == want && sw.linkedAs(opts.ServerName) == want
	})
	return ls
}

// siteDevice is an active device at site, connected to url.
func (sw *siteWorld) siteDevice(url, site string) (*client, string) {
	t := sw.t
	kp := newKey(t)
	tok, err := sw.c.Authority().IssueSiteUser(subjects.RoleAgent, pubOf(kp), "dev", site, 0)
	if err != nil {
		t.Fatal(err)
	}
	recordDevice(t, sw.c, pubOf(kp), site)
	return mustDial(t, url, &accounts.Creds{JWT: tok, Key: kp}), pubOf(kp)
}

// mirrored waits until berlin's mirrors hold n narinfos and the chunks
// of the cache.
func mirrored(t *testing.T, ls *server.Server, core string, narinfos, objMsgs uint64) {
	t.Helper()
	poll.Until(t, 20*time.Second, "the site's mirrors filled", func() bool {
		jsz, err := ls.Jsz(&server.JSzOptions{Accounts: true, Streams: true})
		if err != nil {
			return false
		}
		var ni, obj uint64
		for _, ad := range jsz.AccountDetails {
			if ad.Id != core {
				continue
			}
			for _, st := range ad.Streams {
				switch st.Name {
				case subjects.StreamSiteNarInfo:
					ni = st.State.Msgs
				case subjects.StreamSiteCache:
					obj = st.State.Msgs
				}
			}
		}
		return ni >= narinfos && obj >= objMsgs
	})
}

// siteStreams is the message count of each stream of account acc at ls.
func siteStreams(t *testing.T, ls *server.Server, acc string) map[string]uint64 {
	t.Helper()
	jsz, err := ls.Jsz(&server.JSzOptions{Accounts: true, Streams: true})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]uint64{}
	for _, ad := range jsz.AccountDetails {
		if ad.Id == acc {
			for _, st := range ad.Streams {
				out[st.Name] = st.State.Msgs
			}
		}
	}
	return out
}

// Two devices at a site read one NAR file: from the site's copy, which
// crossed the WAN once, not through the coordinator.
func TestSiteCacheOneCopy(t *testing.T) {
	sw := newSiteWorld(t)
	chunk := int(sw.c.svc.cache.objChunk())
	ni, raw, data := sw.fakeNar("system", 3*chunk+100)
	sw.mustPush(raw)
	ls := sw.startSite(true)
	// Three chunks and the meta; one narinfo.
	mirrored(t, ls, sw.lc.CoreAccount, 1, 5)

	out0 := leafOutBytes(t, sw.c)
	if out0 < int64(len(data)) || out0 > int64(len(data))*3/2 {
		t.Fatalf("the mirrors took %d bytes across the leaf links for a %d-byte file", out0, len(data))
	}
	for i := range 2 {
		cl, id := sw.siteDevice(ls.ClientURL(), "berlin")
		srv, err := agent.ServeFleetCache(cl.Conn, id, zerolog.Nop())
		if err != nil {
			t.Fatal(err)
		}
		if code, _ := cacheGet(t, srv.URL()+"/"+ni.HashPart()+".narinfo"); code != 200 {
			t.Fatalf("device %d: narinfo %d", i, code)
		}
		if code, got := cacheGet(t, srv.URL()+"/"+ni.URL); code != 200 || !bytes.Equal(got, data) {
			t.Fatalf("device %d: NAR %d, %d bytes", i, code, len(got))
		}
		if site, hub := srv.NarInfos(); site != 1 || hub != 0 {
			t.Fatalf("device %d: narinfos from the site %d, from the hub %d", i, site, hub)
		}
		_ = srv.Close()
	}
	if v := cacheMetric(t, sw.c, "fleet_cache_sent_bytes_total", map[string]string{"site": "berlin"}); v != 0 {
		t.Fatalf("the coordinator sent berlin %v NAR bytes", v)
	}
	// Two reads crossed the WAN as no bytes of the file.
	if d := leafOutBytes(t, sw.c) - out0; d > int64(len(data))/4 {
		t.Fatalf("two reads at the site took %d more bytes across the leaf links (file: %d)", d, len(data))
	}
}

// leafOutBytes is what the hub sent over all its leaf links.
func leafOutBytes(t *testing.T, c *Coordinator) int64 {
	t.Helper()
	lz, err := c.Server().Leafz(nil)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, l := range lz.Leafs {
		n += l.OutBytes
	}
	return n
}

// readAt reads ni's narinfo and file as a device at site connected to url
// and returns where its narinfo came from.
func (sw *siteWorld) readAt(url, site string, ni *model.NarInfo, data []byte) (fromSite bool) {
	t := sw.t
	t.Helper()
	cl, id := sw.siteDevice(url, site)
	srv, err := agent.ServeFleetCache(cl.Conn, id, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if code, _ := cacheGet(t, srv.URL()+"/"+ni.HashPart()+".narinfo"); code != 200 {
		t.Fatalf("narinfo: %d", code)
	}
	if code, got := cacheGet(t, srv.URL()+"/"+ni.URL); code != 200 || !bytes.Equal(got, data) {
		t.Fatalf("NAR: %d, %d bytes", code, len(got))
	}
	s, _ := srv.NarInfos()
	return s == 1
}

// A site without a copy, and a site whose copy is cold, read the hub's
// cache through the coordinator.
func TestSiteCacheFallback(t *testing.T) {
	sw := newSiteWorld(t)
	ni, raw, data := sw.fakeNar("system", 2*int(sw.c.svc.cache.objChunk())+1000)
	sw.mustPush(raw)
	plain := sw.startSite(false)
	if sw.readAt(plain.ClientURL(), "berlin", ni, data) {
		t.Fatal("a site with no copy served the narinfo")
	}
	if v := cacheMetric(t, sw.c, "fleet_cache_sent_bytes_total", map[string]string{"site": "berlin"}); v != float64(len(data)) {
		t.Fatalf("the coordinator sent berlin %v bytes, want %d", v, len(data))
	}
	plain.Shutdown()
	plain.WaitForShutdown()

	ls := sw.startSite(true)
	mirrored(t, ls, sw.lc.CoreAccount, 1, 4)
	core, err := sw.c.Authority().CoreUser("test-site-admin")
	if err != nil {
		t.Fatal(err)
	}
	cl := mustDial(t, ls.ClientURL(), core)
	js, err := jetstream.New(cl.Conn)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t, 10*time.Second)
	// The copy lost the file's first chunk (the oldest go first when it
	// is full): its narinfo is read there, the file from the hub.
	st, err := js.Stream(ctx, subjects.StreamSiteCache)
	if err == nil {
		err = st.Purge(ctx, jetstream.WithPurgeSequence(2))
	}
	if err != nil {
		t.Fatal(err)
	}
	if !sw.readAt(ls.ClientURL(), "berlin", ni, data) {
		t.Fatal("the narinfo was not read at the site")
	}
	if v := cacheMetric(t, sw.c, "fleet_cache_sent_bytes_total", map[string]string{"site": "berlin"}); v != 2*float64(len(data)) {
		t.Fatalf("the coordinator sent berlin %v bytes, want %d", v, 2*len(data))
	}
	// Cold: the copy lost what it held.
	for _, name := range []string{subjects.StreamSiteCache, subjects.StreamSiteNarInfo} {
		st, err := js.Stream(ctx, name)
		if err == nil {
			err = st.Purge(ctx)
		}
		if err != nil {
			t.Fatalf("purge %s at the site: %v", name, err)
		}
	}
	if sw.readAt(ls.ClientURL(), "berlin", ni, data) {
		t.Fatal("a cold copy served the narinfo")
	}
	if v := cacheMetric(t, sw.c, "fleet_cache_sent_bytes_total", map[string]string{"site": "berlin"}); v != 3*float64(len(data)) {
		t.Fatalf("the coordinator sent berlin %v bytes, want %d", v, 3*len(data))
	}
	// A device at the hub reads the hub's, and asking the sites' imports
	// there gets no answer.
	if sw.readAt(sw.c.ClientURL(), subjects.DefaultSite, ni, data) {
		t.Fatal("a device at the hub read a site's copy")
	}
}

// TestSiteCacheRogueLink: a rogue leaf with a site's cache creds (the
// whole of what a stolen site gives) tries the hub's state and the other
// sites. Its link binds to berlin's own link account: it may reset its own
// consumers, and the server answers that reset through a reply of its own
// making, on the reply subject the rogue named but inside berlin's
// account: no such subject (a KV bucket's, the JetStream API's, another
// site's API or the coordinator's requests to it) is ever published in
// CORE or reaches paris, even a paris whose JetStream parses requests
// leniently. Everything else is refused at the link.
func TestSiteCacheRogueLink(t *testing.T) {
	sw := newSiteWorld(t)
	ctx := ctxT(t, 60*time.Second)
	auth := sw.c.Authority()
	_, raw, _ := sw.fakeNar("system", 3*int(sw.c.svc.cache.objChunk())+100)
	sw.mustPush(raw)
	berlin, err := auth.SiteLinkAccount("berlin")
	if err != nil {
		t.Fatal(err)
	}
	ck, err := accounts.ReadCreds(sw.coreCreds)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dial(sw.c.ClientURL(), ck); err == nil || !isAuthError(err) {
		t.Fatalf("the site's cache link as a client at the hub: %v", err)
	}
	if uc, err := jwt.DecodeUserClaims(ck.JWT); err != nil || uc.IssuerAccount != berlin {
		t.Fatalf("the site's cache link is not a user of berlin's link account: %v", err)
	}

	// paris: an honest site, lenient, its copy filled.
	paris := sw.addSite("paris")
	ps := sw.startSiteOf(paris, true, true)
	mirrored(t, ps, paris.lc.CoreAccount, 1, 5)
	parisCopy := siteStreams(t, ps, paris.lc.CoreAccount)

	// Everything published in CORE, and in paris's link account at the hub.
	coreUser, err := auth.CoreUser("test-core")
	if err != nil {
		t.Fatal(err)
	}
	hc, inCore := sw.listen(coreUser, ">")
	parisUser, err := auth.SiteLinkUser("paris", "test-paris")
	if err != nil {
		t.Fatal(err)
	}
	pc, inParis := sw.listen(parisUser, ">")
	linkUser, err := auth.SiteLinkUser("berlin", "test-berlin")
	if err != nil {
		t.Fatal(err)
	}
	_, barrier := sw.listen(linkUser, subjects.SiteCacheReply("berlin", "barrier"))

	rogue := sw.rogueLeaf("rogue", sw.coreCreds)
	poll.Until(t, 10*time.Second, "the hub's interest at the rogue leaf", func() bool {
		acc, err := rogue.LookupAccount(server.DEFAULT_GLOBAL_ACCOUNT)
		return err == nil && acc.SubscriptionInterest(barrier.Subject)
	})
	rc, err := nats.Connect(rogue.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	answers, err := rc.SubscribeSync("$JSC.R.rogue")
	if err != nil {
		t.Fatal(err)
	}
	seen, err := rc.SubscribeSync(">")
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.Flush(); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, "the rogue's interest at the hub", func() bool {
		acc, err := sw.c.Server().LookupAccount(berlin)
		return err == nil && acc.SubscriptionInterest(answers.Subject)
	})

	obj := subjects.ObjectStream(subjects.ObjectCache)
	own := subjects.SiteHubAPI + ".CONSUMER.RESET." + obj + "." + subjects.SiteCacheConsumer("berlin", subjects.SiteCacheObj)
	evil := `{"stream_name":"` + obj + `","config":{"durable_name":"evil","deliver_subject":"$KV.` + subjects.BucketAdmins + `.pwn","ack_policy":"none"}}`
	pwn := "$KV." + subjects.BucketAdmins + ".pwn"
	type attempt struct{ subj, reply, body string }
	attempts := []attempt{
		// Its own consumer's reset, answered into the bucket, the API, CORE's inboxes.
		{own, pwn, ``},
		{own, "$JS.API.STREAM.CREATE.EVIL", `{"name":"EVIL","subjects":["evil.>"]}`},
		{own, "$JS.fleet.API.STREAM.DELETE." + subjects.KVStream(subjects.BucketAdmins), ``},
		{own, "_INBOX.core", ``},
		// ... into paris's JetStream API, its feed, the coordinator's
		// requests to it, and its reset answers.
		{own, subjects.JSAPIPrefix("paris") + ".STREAM.PURGE." + subjects.StreamSiteCache, ``},
		{own, subjects.JSAPIPrefix("paris") + ".STREAM.PURGE." + subjects.StreamSiteNarInfo, ``},
		{own, subjects.SiteCacheDeliver("paris", subjects.SiteCacheObj), ``},
		{own, subjects.SiteCacheReply("paris", "x"), ``},
		{own, "$JSC.R.paris", ``},
		// Its flow control, with a reply.
		{"$JS.FC." + obj + "." + subjects.SiteCacheConsumer("berlin", subjects.SiteCacheObj) + ".x", pwn, `{}`},
		// Another site's consumer, consumers of its own making, the API.
		{subjects.SiteHubAPI + ".CONSUMER.RESET." + obj + "." + subjects.SiteCacheConsumer("paris", subjects.SiteCacheObj), "$JSC.R.rogue", ``},
		{subjects.SiteHubAPI + ".CONSUMER.CREATE." + obj, "$JSC.R.rogue", evil},
		{subjects.SiteHubAPI + ".CONSUMER.CREATE." + obj + ".evil", "$JSC.R.rogue", evil},
		{"$JS.fleet.API.CONSUMER.CREATE." + obj, "$JSC.R.rogue", evil},
		{"$JS.API.CONSUMER.CREATE." + obj, "$JSC.R.rogue", evil},
		{"$JS.fleet.API.STREAM.CREATE.EVIL", "$JSC.R.rogue", `{"name":"EVIL","subjects":["evil.>"]}`},
		{"$JS.fleet.API.DIRECT.GET." + subjects.KVStream(subjects.BucketAdmins), "$JSC.R.rogue", `{"seq":1}`},
		{subjects.JSAPIPrefix("paris") + ".STREAM.PURGE." + subjects.StreamSiteCache, "$JSC.R.rogue", ``},
		{pwn, "", `{}`},
		{subjects.APIWriteVerb(subjects.VerbCachePut), "$JSC.R.rogue", `{}`},
		{subjects.SiteCacheDeliver("paris", subjects.SiteCacheObj), "", `{}`},
		{subjects.SiteCacheReply("paris", "x"), "", `{}`},
	}
	sent := map[string]bool{}
	for _, a := range attempts {
		sent[a.subj] = true
		if err := rc.PublishMsg(&nats.Msg{Subject: a.subj, Reply: a.reply, Data: []byte(a.body)}); err != nil {
			t.Fatal(err)
		}
	}
	// A reset it may send is answered, into the link only; the answers
	// above went out before this one.
	if err := rc.PublishRequest(own, answers.Subject, nil); err != nil {
		t.Fatal(err)
	}
	m, err := answers.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("its own consumer's reset, answered: %v", err)
	}
	var reset struct {
		Type  string `json:"type"`
		Error any    `json:"error"`
	}
	if err := json.Unmarshal(m.Data, &reset); err != nil || !strings.Contains(reset.Type, "consumer_reset_response") || reset.Error != nil {
		t.Fatalf("the reset's answer: %s", m.Data)
	}
	// The link is one connection: once a message sent after them reached
	// the hub, every one before it was dealt with.
	if err := rc.Publish(barrier.Subject, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := barrier.NextMsg(10 * time.Second); err != nil {
		t.Fatalf("barrier: %v", err)
	}
	for _, c := range []*client{hc, pc} {
		if err := c.Flush(); err != nil {
			t.Fatal(err)
		}
	}

	js := sw.c.JetStream()
	admins, err := js.KeyValue(ctx, subjects.BucketAdmins)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admins.Get(ctx, "pwn"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("the rogue link wrote the admins bucket: %v", err)
	}
	if _, err := js.Stream(ctx, "EVIL"); !errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Fatalf("the rogue link made a stream: %v", err)
	}
	if _, err := js.Stream(ctx, subjects.KVStream(subjects.BucketAdmins)); err != nil {
		t.Fatalf("the admins bucket: %v", err)
	}
	st, err := js.Stream(ctx, obj)
	if err != nil {
		t.Fatal(err)
	}
	names := st.ConsumerNames(ctx)
	for n := range names.Name() {
		if n != subjects.SiteCacheConsumer("berlin", subjects.SiteCacheObj) && n != subjects.SiteCacheConsumer("paris", subjects.SiteCacheObj) {
			t.Fatalf("consumer %s on the cache", n)
		}
	}
	// No subject the rogue named, as subject or reply, was published in
	// CORE or in paris's account.
	named := map[string]bool{answers.Subject: true}
	for _, a := range attempts {
		named[a.subj], named[a.reply] = true, true
	}
	for where, sub := range map[string]*nats.Subscription{"CORE": inCore, "paris's link account": inParis} {
		for {
			m, err := sub.NextMsg(0)
			if err != nil {
				break
			}
			if named[m.Subject] && !strings.HasPrefix(m.Subject, "$JS.FC.") && m.Subject != own &&
				!(where == "paris's link account" && m.Subject == subjects.SiteCacheDeliver("paris", subjects.SiteCacheObj) && m.Reply != "") {
				t.Errorf("%s saw %q (reply %q)", where, m.Subject, m.Reply)
			}
		}
	}
	// paris's copy is whole.
	if got := siteStreams(t, ps, paris.lc.CoreAccount); got[subjects.StreamSiteCache] != parisCopy[subjects.StreamSiteCache] || got[subjects.StreamSiteNarInfo] != parisCopy[subjects.StreamSiteNarInfo] {
		t.Errorf("paris's copy: %v, was %v", got, parisCopy)
	}
	// What came back to the rogue leaf is its own: its publishes echoed
	// locally, berlin's feed, and the answers it had sent into its own
	// account.
	for {
		m, err := seen.NextMsg(0)
		if err != nil {
			break
		}
		feed := strings.HasPrefix(m.Subject, "fleet.sitecache.berlin.") || strings.HasPrefix(m.Subject, "$O."+subjects.ObjectCache+".") ||
			strings.HasPrefix(m.Subject, "$KV."+subjects.BucketNarInfo+".")
		if !sent[m.Subject] && !named[m.Subject] && !feed && m.Subject != barrier.Subject {
			t.Errorf("the rogue leaf received %q", m.Subject)
		}
	}

	if err := inCore.Unsubscribe(); err != nil {
		t.Fatal(err)
	}

	// A device names only the imports, never the API behind them.
	dev, err := sw.c.Authority().NewUser(subjects.RoleAgent, "dev", 0)
	if err != nil {
		t.Fatal(err)
	}
	recordDevice(t, sw.c, dev.PublicKey(), subjects.DefaultSite)
	dc := mustDial(t, sw.c.ClientURL(), dev)
	for _, subj := range []string{"$JS.API.DIRECT.GET." + subjects.StreamSiteCache, "$JS.API.DIRECT.GET." + subjects.StreamSiteNarInfo + ".$KV.fleet_narinfo.x", subjects.SiteCacheDeliver("berlin", subjects.SiteCacheObj)} {
		_ = dc.Publish(subj, []byte(`{}`))
		dc.errs.waitViolation(t, 5*time.Second, "Publish", subj)
	}
	if _, err := dc.RequestWithContext(ctxT(t, 5*time.Second), subjects.SiteNar, []byte(`{"seq":1,"batch":100}`)); !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("a site import at the hub: %v", err)
	}
}

// A site copy that serves a file other than its narinfo says is cut off
// like any other; the server says the site failed, and a server told to
// skip the site reads the hub's right copy.
func TestSiteCacheBadCopy(t *testing.T) {
	sw := newSiteWorld(t)
	ni, raw, data := sw.fakeNar("system", 300_000)
	sw.mustPush(raw)
	ls := sw.startSite(true)
	mirrored(t, ls, sw.lc.CoreAccount, 1, 2)
	// The site's copy of the files is replaced by a stream that lies:
	// the file's meta, and as many bytes of junk.
	core, err := sw.c.Authority().CoreUser("test-site-admin")
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(mustDial(t, ls.ClientURL(), core).Conn)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t, 10*time.Second)
	if err := js.DeleteStream(ctx, subjects.StreamSiteCache); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: subjects.StreamSiteCache, Subjects: []string{"$O." + subjects.ObjectCache + ".>"}, AllowDirect: true}); err != nil {
		t.Fatal(err)
	}
	junk := bytes.Repeat([]byte{'x'}, len(data))
	if _, err := js.Publish(ctx, "$O."+subjects.ObjectCache+".C.liar", junk); err != nil {
		t.Fatal(err)
	}
	meta, _ := json.Marshal(map[string]any{"name": ni.URL, "nuid": "liar", "size": len(data), "chunks": 1})
	if _, err := js.Publish(ctx, "$O."+subjects.ObjectCache+".M."+base64.URLEncoding.EncodeToString([]byte(ni.URL)), meta); err != nil {
		t.Fatal(err)
	}

	cl, id := sw.siteDevice(ls.ClientURL(), "berlin")
	srv, err := agent.ServeFleetCache(cl.Conn, id, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if code, _ := cacheGet(t, srv.URL()+"/"+ni.HashPart()+".narinfo"); code != 200 {
		t.Fatalf("narinfo %d", code)
	}
	// Cut off (a client that retries then hears the file refused).
	if code, got := cacheGet(t, srv.URL()+"/"+ni.URL); code == 200 || bytes.Equal(got, junk) {
		t.Fatalf("a lying copy: %d, %d bytes", code, len(got))
	}
	if !srv.SiteFailed() || !errors.Is(srv.Refused(), agent.ErrCacheRefused) {
		t.Fatalf("site failed %v, refused %v", srv.SiteFailed(), srv.Refused())
	}
	hub, err := agent.ServeFleetCache(cl.Conn, id, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer hub.Close()
	hub.SkipSite()
	if code, _ := cacheGet(t, hub.URL()+"/"+ni.HashPart()+".narinfo"); code != 200 {
		t.Fatalf("narinfo from the hub %d", code)
	}
	if code, got := cacheGet(t, hub.URL()+"/"+ni.URL); code != 200 || !bytes.Equal(got, data) {
		t.Fatalf("from the hub: %d, %d bytes", code, len(got))
	}
	if s, h := hub.NarInfos(); s != 0 || h != 1 {
		t.Fatalf("narinfos: site %d, hub %d", s, h)
	}
}

// rogueLeaf starts a plain leaf node named name with one remote to the
// hub, authenticated with creds.
func (sw *siteWorld) rogueLeaf(name, creds string) *server.Server {
	t := sw.t
	hub, err := url.Parse(sw.c.LeafURL())
	if err != nil {
		t.Fatal(err)
	}
	ls, err := server.NewServer(&server.Options{
		ServerName: name, Host: "127.0.0.1", Port: server.RANDOM_PORT, NoSigs: true, NoLog: true,
		LeafNode: server.LeafNodeOpts{ReconnectInterval: 100 * time.Millisecond, Remotes: []*server.RemoteLeafOpts{{URLs: []*url.URL{hub}, Credentials: creds}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	ls.Start()
	t.Cleanup(func() { ls.Shutdown(); ls.WaitForShutdown() })
	if !ls.ReadyForConnections(10 * time.Second) {
		t.Fatal("leaf not ready")
	}
	return ls
}

// listen connects to the hub as cr and subscribes to subj; the server has
// the subscription when it returns.
func (sw *siteWorld) listen(cr *accounts.Creds, subj string) (*client, *nats.Subscription) {
	sw.t.Helper()
	c := mustDial(sw.t, sw.c.ClientURL(), cr)
	sub, err := c.SubscribeSync(subj)
	if err != nil {
		sw.t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		sw.t.Fatal(err)
	}
	return c, sub
}

// leafRefusals follows the hub's refusals of leaf links (its
// authentication errors, as the system account hears them) from now on.
// The function it returns waits until a leaf named each of names was
// refused since its last call that named it.
func (sw *siteWorld) leafRefusals() func(names ...string) {
	t := sw.t
	sys, err := sw.c.Authority().SystemUser("test-sys")
	if err != nil {
		t.Fatal(err)
	}
	_, authErrs := sw.listen(sys, "$SYS.SERVER.*.CLIENT.AUTH.ERR")
	heard := map[string]bool{}
	return func(names ...string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for _, n := range names {
			for !heard[n] {
				m, err := authErrs.NextMsg(time.Until(deadline))
				if err != nil {
					t.Fatalf("no refusal of leaf %s heard: %v", n, err)
				}
				var ev struct {
					Client struct {
						Name string `json:"name"`
						Kind string `json:"kind"`
					} `json:"client"`
				}
				if json.Unmarshal(m.Data, &ev) == nil && ev.Client.Kind == "Leafnode" {
					heard[ev.Client.Name] = true
				}
			}
		}
		for _, n := range names {
			delete(heard, n)
		}
	}
}

// linkedAs reports how many leaf links the hub has from servers named name.
func (sw *siteWorld) linkedAs(name string) int {
	lz, err := sw.c.Server().Leafz(nil)
	if err != nil {
		sw.t.Fatal(err)
	}
	n := 0
	for _, l := range lz.Leafs {
		if l.Name == name {
			n++
		}
	}
	return n
}

// A site has one cache link, the last issued: leaf config --cache again
// cuts off every copy of the earlier leaf-cache.creds (a thief's link is
// dropped and refused from then on, its slots freed), and the new one
// links and fills the site's copy.
func TestSiteCacheLinkReissued(t *testing.T) {
	sw := newSiteWorld(t)
	_, raw, _ := sw.fakeNar("system", int(sw.c.svc.cache.objChunk())+100)
	sw.mustPush(raw)
	old := sw.testSite
	for i := range 4 {
		name := fmt.Sprintf("thief-%d", i)
		sw.rogueLeaf(name, old.coreCreds)
		poll.Until(t, 10*time.Second, name+" linked with the first creds", func() bool { return sw.linkedAs(name) == 1 })
	}
	// The next leaf config comes in a later second than the first link's
	// issue (JWT times are whole seconds).
	ck, err := accounts.ReadCreds(old.coreCreds)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := ck.Claims()
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 3*time.Second, "a second after the first link", func() bool { return time.Now().Unix() > uc.IssuedAt })
	refused := sw.leafRefusals()
	again := sw.addSite("berlin")
	poll.Until(t, 10*time.Second, "the thieves cut off", func() bool {
		for i := range 4 {
			if sw.linkedAs(fmt.Sprintf("thief-%d", i)) != 0 {
				return false
			}
		}
		return true
	})
	ls := sw.startSiteOf(again, true, false)
	mirrored(t, ls, again.lc.CoreAccount, 1, 2)
	// They retry, and are refused.
	refused("thief-0", "thief-1", "thief-2", "thief-3")
	for i := range 4 {
		if n := sw.linkedAs(fmt.Sprintf("thief-%d", i)); n != 0 {
			t.Fatalf("thief-%d linked again with the first creds", i)
		}
	}
}

// Sites' cache links were CORE users before they had accounts of their
// own: such creds, and any CORE user, are refused as a leaf link (CORE's
// signing key is scoped to the coordinators' client connections), so no
// leaf reaches the state's account.
func TestCoreUsersAreNoLeafLinks(t *testing.T) {
	sw := newSiteWorld(t)
	auth := sw.c.Authority()
	svc, err := accounts.ReadSeed(filepath.Join(sw.c.cfg.DataDir, accounts.KeysDir, "core-service.nk"), nkeys.PrefixByteAccount)
	if err != nil {
		t.Fatal(err)
	}
	// As the earlier versions issued them: permissions of their own.
	kp := newKey(t)
	uc := jwt.NewUserClaims(pubOf(kp))
	uc.Name = "leaf-berlin-cache"
	uc.IssuerAccount = auth.CoreAccount()
	uc.Pub.Allow.Add("$JS.API.CONSUMER.RESET.>", "$JS.fleet.API.CONSUMER.RESET.>", "$JS.FC.>")
	uc.Sub.Allow.Add("fleet.sitecache.>", "$JSC.R.>")
	uc.AllowedConnectionTypes.Add(jwt.ConnectionTypeLeafnode)
	tok, err := uc.Encode(svc)
	if err != nil {
		t.Fatal(err)
	}
	legacy := filepath.Join(t.TempDir(), "legacy.creds")
	if err := accounts.WriteCreds(legacy, &accounts.Creds{JWT: tok, Key: kp}); err != nil {
		t.Fatal(err)
	}
	// And a coordinator's own CORE user.
	own, err := auth.CoreUser("own")
	if err != nil {
		t.Fatal(err)
	}
	ownFile := filepath.Join(t.TempDir(), "own.creds")
	if err := accounts.WriteCreds(ownFile, own); err != nil {
		t.Fatal(err)
	}
	refused := sw.leafRefusals()
	sw.rogueLeaf("legacy", legacy)
	sw.rogueLeaf("own", ownFile)
	refused("legacy", "own")
	if sw.linkedAs("legacy") != 0 || sw.linkedAs("own") != 0 {
		t.Fatalf("a CORE user linked as a leaf: legacy %d, own %d", sw.linkedAs("legacy"), sw.linkedAs("own"))
	}
	// A coordinator's CORE user still connects as a client.
	if _, err := dial(sw.c.ClientURL(), own); err != nil {
		t.Fatalf("a coordinator's CORE user as a client: %v", err)
	}
}

// leaf revoke cuts a site off: every cache link it was issued and the leaf
// links named, at once and for good (the site's leaf keeps trying); it
// refuses an admin's or a device's key; and a new leaf config brings the
// site back with new links.
func TestLeafRevoke(t *testing.T) {
	sw := newSiteWorld(t)
	ctx := ctxT(t, 60*time.Second)
	_, raw, _ := sw.fakeNar("system", int(sw.c.svc.cache.objChunk())+100)
	sw.mustPush(raw)
	ls := sw.startSite(true)
	mirrored(t, ls, sw.lc.CoreAccount, 1, 2)
	refused := sw.leafRefusals()
	lk, err := accounts.ReadCreds(sw.leafCreds)
	if err != nil {
		t.Fatal(err)
	}
	dev := newKey(t)
	recordDevice(t, sw.c, pubOf(dev), "berlin")
	ownerKey, err := accounts.ReadCreds(filepath.Join(sw.c.cfg.DataDir, accounts.AdminCredsFile))
	if err != nil {
		t.Fatal(err)
	}
	var out model.LeafRevoked
	for _, bad := range []struct {
		req  model.LeafRevoke
		want string
	}{
		{model.LeafRevoke{Site: "berlin", Keys: []string{ownerKey.PublicKey()}}, "admin"},
		{model.LeafRevoke{Site: "berlin", Keys: []string{pubOf(dev)}}, "devices revoke"},
		{model.LeafRevoke{Site: "berlin", Keys: []string{"UNOTAKEY"}}, "not an nkey"},
		{model.LeafRevoke{Site: "paris"}, "no copy of the cache"},
		{model.LeafRevoke{Site: subjects.DefaultSite, Keys: []string{lk.PublicKey()}}, "hub"},
		{model.LeafRevoke{Site: "berlin", Keys: slices.Repeat([]string{lk.PublicKey()}, 65)}, "at most 64"},
	} {
		if err := sw.owner.Call(ctx, subjects.VerbLeafRevoke, true, bad.req, &out); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Fatalf("leaf revoke %+v: %v", bad.req, err)
		}
	}
	// Only an owner may.
	op, err := c2admin(t, sw.c, subjects.RoleOperator, "op")
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()
	if err := op.Call(ctx, subjects.VerbLeafRevoke, true, model.LeafRevoke{Site: "berlin", Keys: []string{lk.PublicKey()}}, &out); err == nil || !strings.Contains(err.Error(), "owner") {
		t.Fatalf("an operator's leaf revoke: %v", err)
	}
	if sw.linkedAs("leaf-berlin") != 2 {
		t.Fatalf("berlin's links after the refused revokes: %d", sw.linkedAs("leaf-berlin"))
	}

	if err := sw.owner.Call(ctx, subjects.VerbLeafRevoke, true, model.LeafRevoke{Site: "berlin", Keys: []string{lk.PublicKey()}}, &out); err != nil {
		t.Fatal(err)
	}
	if !out.CacheLinks || len(out.Keys) != 1 || out.Keys[0] != lk.PublicKey() {
		t.Fatalf("leaf revoke: %+v", out)
	}
	poll.Until(t, 10*time.Second, "berlin's links cut off", func() bool { return sw.linkedAs("leaf-berlin") == 0 })
	// The leaf retries; it is refused and stays out.
	refused("leaf-berlin")
	if lz, _ := ls.Leafz(nil); sw.linkedAs("leaf-berlin") != 0 || lz == nil || len(lz.Leafs) != 0 {
		t.Fatal("berlin linked again after the revoke")
	}
	// A coordinator restarted reads the revocation from the consumers.
	st, err := sw.c.JetStream().Stream(ctx, subjects.ObjectStream(subjects.ObjectCache))
	if err != nil {
		t.Fatal(err)
	}
	cons, err := st.PushConsumer(ctx, subjects.SiteCacheConsumer("berlin", subjects.SiteCacheObj))
	if err != nil {
		t.Fatal(err)
	}
	m, ok := parseSiteMeta(cons.CachedInfo())
	if !ok || !m.revoked {
		t.Fatalf("berlin's consumer after the revoke: %+v", m)
	}
	// Another coordinator of the cluster, in a pass begun before the
	// revoke, would push the account as it was: it reads the consumers
	// again first, and pushes nothing older.
	ck, err := accounts.ReadCreds(sw.coreCreds)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := ck.Claims()
	if err != nil {
		t.Fatal(err)
	}
	peer := &cacheStore{s: sw.c.svc.cache.s, log: sw.c.svc.cache.log}
	if _, err := peer.siteConn(ctx, "berlin", time.Unix(uc.IssuedAt, 0)); err == nil {
		t.Fatal("a peer pushed berlin's account as it was before the revoke")
	}
	sw.rogueLeaf("thief", sw.coreCreds)
	refused("thief")
	if lz, _ := ls.Leafz(nil); sw.linkedAs("thief") != 0 || lz == nil || len(lz.Leafs) != 0 {
		t.Fatal("berlin's revoked links are back")
	}

	// The leaf key used again (leaf config accepts it: its new JWT is
	// issued after the revocation), then revoked again: cut off again.
	reuse := &testSite{name: "berlin-reuse"}
	// (The revocation covers the second after it too.)
	poll.Until(t, 4*time.Second, "two seconds after the revoke", func() bool { return time.Now().Unix() > out.At.Unix()+1 })
	if err := sw.owner.Call(ctx, subjects.VerbLeafConfig, true, model.LeafConfigRequest{Site: "berlin", Key: lk.PublicKey()}, &reuse.lc); err != nil {
		t.Fatal(err)
	}
	reuse.leafCreds = filepath.Join(t.TempDir(), "leaf.creds")
	if err := accounts.WriteCreds(reuse.leafCreds, &accounts.Creds{JWT: reuse.lc.JWT, Key: lk.Key}); err != nil {
		t.Fatal(err)
	}
	sw.startSiteOf(reuse, false, false)
	if err := sw.owner.Call(ctx, subjects.VerbLeafRevoke, true, model.LeafRevoke{Site: "berlin", Keys: []string{lk.PublicKey()}}, &out); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, "the reused key cut off again", func() bool { return sw.linkedAs("leaf-berlin-reuse") == 0 })

	// A new leaf config: new links, the site back.
	poll.Until(t, 3*time.Second, "a second after the revoke", func() bool { return time.Now().Unix() > out.At.Unix() })
	again := sw.addSite("berlin")
	ls2 := sw.startSiteOf(again, true, false)
	mirrored(t, ls2, again.lc.CoreAccount, 1, 2)
}
