package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"fleet/model"
	"fleet/subjects"
)

// A site's copy of the binary cache (fleet-admin leaf config --cache).
//
// The site's leaf node runs JetStream in its own domain (the site's name)
// and holds, in its CORE, two mirrors: subjects.StreamSiteCache of the
// object store's stream and subjects.StreamSiteNarInfo of the narinfo
// bucket's, each bounded in bytes and age. Each mirror is fed by a durable
// consumer the coordinator makes on the hub's stream for that site
// (flow-control acks, a fixed deliver subject), so the site's link needs
// no right to make consumers: one of its own making could deliver the
// cache into any subject, a KV bucket's among them.
//
// At the hub the link binds to the site's own link account, never to CORE
// (subjects.SiteLinkImports): it may only reset its two consumers, answer
// their flow control and the coordinator's requests
// (subjects.SiteCacheTemplate), and each of those reaches CORE through a
// service import, whose reply the server makes. An answer goes to the
// reply subject the site named, but in the site's own account: never into
// CORE, nor to another site's link or the coordinator's requests to it.
//
// The coordinator creates the mirrors in the site's domain over that link
// once it is up (siteLoop), from its own connection to the site's account
// (siteConn, which pushes the account's JWT first), with the
// bounds it keeps in the consumers' metadata; devices at the site then
// read them through FLEET's two service imports (read-only direct gets),
// one transfer across the WAN per file per site. At the hub nothing
// answers those imports, and the agent reads through the coordinator as
// before.

const (
	// siteMetaSite, siteMetaBytes and siteMetaAge are the consumer
	// metadata that name the site and the bounds of its mirrors.
	siteMetaSite  = "fleet_site"
	siteMetaBytes = "fleet_site_max_bytes"
	siteMetaAge   = "fleet_site_max_age"
	// siteMetaLinks is when the site's cache link was last issued (unix
	// seconds): its link account revokes every link issued before.
	siteMetaLinks = "fleet_site_links_from"
	// siteMetaRevoked marks a site whose links were revoked (leaf
	// revoke): its copy is no longer fed, until a leaf config --cache.
	siteMetaRevoked = "fleet_site_revoked"
	// siteMirrorEvery is how often the coordinator checks that every
	// site's mirrors exist (also when a site's link comes up).
	siteMirrorEvery = time.Minute
	siteRetry       = 2 * time.Second
	// siteMaxAckPending bounds the chunks in flight to a site.
	siteMaxAckPending = 64
	// siteMinBytes and siteMinAge are the smallest bounds a site's copy
	// may have.
	siteMinBytes = 64 << 20
	siteMinAge   = time.Hour
)

// checkSiteCache checks the bounds a site's copy asks for.
func checkSiteCache(sc *model.SiteCache) error {
	switch {
	case sc.MaxBytes < siteMinBytes:
		return badRequest("a site's cache of %d bytes: at least %d", sc.MaxBytes, siteMinBytes)
	case time.Duration(sc.MaxAge) < siteMinAge:
		return badRequest("a site's cache kept for %s: at least %s", time.Duration(sc.MaxAge), siteMinAge)
	}
	return nil
}

// setupSiteConsumers makes (or updates) site's two consumers on the hub's
// cache streams, with the mirrors' bounds and the issue time of its link in
// their metadata.
func (s *services) setupSiteConsumers(ctx context.Context, site string, sc *model.SiteCache, linksFrom time.Time, revoked bool) error {
	for _, src := range subjects.SiteSources() {
		md := map[string]string{
			siteMetaSite:  site,
			siteMetaBytes: strconv.FormatInt(sc.MaxBytes, 10),
			siteMetaAge:   time.Duration(sc.MaxAge).String(),
			siteMetaLinks: strconv.FormatInt(linksFrom.Unix(), 10),
		}
		if revoked {
			md[siteMetaRevoked] = "1"
		}
		_, err := s.c.js.CreateOrUpdatePushConsumer(ctx, src.Stream, jetstream.ConsumerConfig{
			Durable:        subjects.SiteCacheConsumer(site, src.Kind),
			Description:    "feeds the cache mirror at site " + site,
			DeliverSubject: subjects.SiteCacheDeliver(site, src.Kind),
			DeliverPolicy:  jetstream.DeliverAllPolicy,
			AckPolicy:      jetstream.AckFlowControlPolicy,
			FlowControl:    true,
			IdleHeartbeat:  time.Second,
			MaxAckPending:  siteMaxAckPending,
			Metadata:       md,
		})
		if err != nil {
			return fmt.Errorf("site %s: consumer on %s: %w", site, src.Stream, err)
		}
	}
	return nil
}

// siteLoop keeps every site's mirrors in place: at start, after a leaf
// config, soon again while a site's are not (its link may not be up yet: a
// request into a domain nobody serves fails at once), from siteRetry
// doubling up to every, else every every (a leaf whose JetStream data was
// lost gets them back).
func (cs *cacheStore) siteLoop(ctx context.Context, every time.Duration) {
	defer close(cs.siteDone)
	t := time.NewTimer(0)
	defer t.Stop()
	retry := siteRetry
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-cs.siteKick:
			retry = siteRetry
		}
		next := every
		if cs.ensureSiteMirrors(ctx) {
			next, retry = retry, min(2*retry, every)
		} else {
			retry = siteRetry
		}
		t.Reset(next)
	}
}

// kickSites has siteLoop check the sites' mirrors now.
func (cs *cacheStore) kickSites() {
	select {
	case cs.siteKick <- struct{}{}:
	default:
	}
}

// siteMeta is what a site's consumer's metadata says of the site.
type siteMeta struct {
	site string
	sc   *model.SiteCache
	// from is the issue time of its link (zero when not recorded);
	// revoked says every link was revoked.
	from    time.Time
	revoked bool
}

// parseSiteMeta reads a site's name, bounds and links from a consumer's
// metadata.
func parseSiteMeta(ci *jetstream.ConsumerInfo) (siteMeta, bool) {
	md := ci.Config.Metadata
	site := md[siteMetaSite]
	n, err1 := strconv.ParseInt(md[siteMetaBytes], 10, 64)
	age, err2 := time.ParseDuration(md[siteMetaAge])
	if site == "" || !subjects.ValidSite(site) || err1 != nil || err2 != nil || ci.Name != subjects.SiteCacheConsumer(site, subjects.SiteCacheObj) {
		return siteMeta{}, false
	}
	m := siteMeta{site: site, sc: &model.SiteCache{MaxBytes: n, MaxAge: model.Duration(age)}, revoked: md[siteMetaRevoked] != ""}
	if sec, err := strconv.ParseInt(md[siteMetaLinks], 10, 64); err == nil && sec > 0 {
		m.from = time.Unix(sec, 0)
	}
	return m, true
}

// ensureSiteMirrors creates the mirrors of every site that has consumers
// and lacks them; it reports whether a site's are not in place yet.
func (cs *cacheStore) ensureSiteMirrors(ctx context.Context) (pending bool) {
	stream, err := cs.s.c.js.Stream(ctx, subjects.ObjectStream(subjects.ObjectCache))
	if err != nil {
		return false
	}
	lister := stream.ListConsumers(ctx)
	for ci := range lister.Info() {
		m, ok := parseSiteMeta(ci)
		if !ok {
			continue
		}
		if m.revoked {
			if err := cs.pushRevokedSite(ctx, m.site, m.from); err != nil {
				cs.log.Warn().Err(err).Str("site", m.site).Msg("site cache: the revocation of the site's links not pushed (yet)")
				pending = true
			}
			continue
		}
		if err := cs.ensureSiteMirror(ctx, m.site, m.sc, m.from); err != nil {
			cs.log.Debug().Err(err).Str("site", m.site).Msg("site cache: mirrors not set up (yet)")
			pending = true
		}
	}
	return pending
}

// siteLinkConn is the coordinator's connection to a site's link account,
// made after pushing the account with links issued before from revoked.
type siteLinkConn struct {
	nc   *nats.Conn
	from time.Time
}

// siteConn returns the coordinator's connection to site's link account,
// whose links issued before from are revoked. A site's account exists
// once a coordinator pushed its JWT: the first call of each coordinator's
// run pushes it (after leaf config --cache, and at start for every site
// with consumers, so a new version's account reaches the servers), and so
// does a call with another from (the link was issued again, here or at
// another coordinator of the cluster), or after the connection was lost.
func (cs *cacheStore) siteConn(ctx context.Context, site string, from time.Time) (*nats.Conn, error) {
	cs.linkMu.Lock()
	defer cs.linkMu.Unlock()
	if l := cs.links[site]; l != nil {
		switch {
		case l.nc == nil && from.Before(l.from):
			// Revoked this very second (JWT times are whole seconds).
			return nil, fmt.Errorf("site %s: its cache links were revoked a moment ago: retry in a second", site)
		case l.nc != nil && l.from.Equal(from) && l.nc.IsConnected():
			return l.nc, nil
		case l.nc != nil:
			l.nc.Close()
		}
		delete(cs.links, site)
	}
	if ctx.Err() != nil || cs.s.c.ns == nil {
		return nil, fmt.Errorf("site %s: coordinator stopping", site)
	}
	// Pushes only go forward: what the consumers say now wins over what
	// the caller read a moment ago (another coordinator may have revoked
	// the site or issued a new link since), or the server would keep an
	// older account signed last.
	if m, err := cs.siteMetaNow(ctx, site); err == nil && (m.revoked || m.from.After(from)) {
		return nil, fmt.Errorf("site %s: its cache link changed meanwhile (revoked or issued again): next pass", site)
	}
	if err := cs.pushSiteLinkLocked(ctx, site, from); err != nil {
		return nil, err
	}
	cr, err := cs.s.c.auth.SiteLinkUser(site, "fleet-coordinator-site-"+site)
	if err != nil {
		return nil, fmt.Errorf("site %s: %w", site, err)
	}
	nc, err := cs.s.c.InProcessConn(cr, "fleet-coordinator-site-"+site)
	if err != nil {
		return nil, fmt.Errorf("site %s: %w", site, err)
	}
	cs.links[site].nc = nc
	return nc, nil
}

// pushRevokedSite pushes site's link account with every link issued before
// from revoked (again on every pass: a peer's push of an older account,
// raced with the revoke, is undone within a pass) and drops the
// coordinator's own connection to it.
func (cs *cacheStore) pushRevokedSite(ctx context.Context, site string, from time.Time) error {
	cs.linkMu.Lock()
	defer cs.linkMu.Unlock()
	return cs.pushSiteLinkLocked(ctx, site, from)
}

// pushSiteLinkLocked drops the coordinator's connection to site's link
// account, pushes the account with every link issued before from revoked,
// and records that (with no connection yet). linkMu is held.
func (cs *cacheStore) pushSiteLinkLocked(ctx context.Context, site string, from time.Time) error {
	if l := cs.links[site]; l != nil && l.nc != nil {
		l.nc.Close()
	}
	delete(cs.links, site)
	tok, err := cs.s.c.auth.SiteLinkJWT(site, from)
	if err != nil {
		return fmt.Errorf("site %s: %w", site, err)
	}
	if err := cs.s.c.PushAccount(ctx, tok); err != nil {
		return fmt.Errorf("site %s: %w", site, err)
	}
	if cs.links == nil {
		cs.links = map[string]*siteLinkConn{}
	}
	cs.links[site] = &siteLinkConn{from: from}
	return nil
}

// siteMetaNow reads site's consumer metadata from the server.
func (cs *cacheStore) siteMetaNow(ctx context.Context, site string) (siteMeta, error) {
	c, err := cs.s.c.js.PushConsumer(ctx, subjects.ObjectStream(subjects.ObjectCache), subjects.SiteCacheConsumer(site, subjects.SiteCacheObj))
	if err != nil {
		return siteMeta{}, fmt.Errorf("site %s: %w", site, err)
	}
	m, ok := parseSiteMeta(c.CachedInfo())
	if !ok {
		return siteMeta{}, fmt.Errorf("site %s: its consumer's metadata is damaged", site)
	}
	return m, nil
}

// revokeSiteLinks revokes every cache link site was issued: its consumers
// keep the revocation in their metadata (so every coordinator, and this
// one after a restart, pushes the same account) and no longer feed a
// mirror; a later leaf config --cache issues a new link. It reports
// whether the site had a copy of the cache.
func (cs *cacheStore) revokeSiteLinks(ctx context.Context, site string) (bool, error) {
	m, err := cs.siteMetaNow(ctx, site)
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	// Every link issued up to this second.
	from := time.Now().Truncate(time.Second).Add(time.Second)
	if err := cs.s.setupSiteConsumers(ctx, site, m.sc, from, true); err != nil {
		return false, err
	}
	if err := cs.pushRevokedSite(ctx, site, from); err != nil {
		return false, err
	}
	cs.log.Info().Str("site", site).Msg("site cache: every cache link of the site revoked")
	return true, nil
}

// jsAPIReply is the part of a JetStream API reply the coordinator reads.
type jsAPIReply struct {
	Error *struct {
		Code        int    `json:"code"`
		ErrCode     int    `json:"err_code"`
		Description string `json:"description"`
	} `json:"error"`
	Config *jetstream.StreamConfig `json:"config"`
}

const jsErrStreamNotFound = 10059

// siteRequest sends a JetStream API request into site's domain over nc,
// the coordinator's connection to the site's link account: the site may
// answer only into its own reply subjects.
func (cs *cacheStore) siteRequest(ctx context.Context, nc *nats.Conn, site, api string, body []byte) (*jsAPIReply, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	sub, err := nc.SubscribeSync(subjects.SiteCacheReply(site, nats.NewInbox()[len(nats.InboxPrefix):]))
	if err != nil {
		return nil, fmt.Errorf("site %s: %w", site, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.PublishRequest(subjects.JSAPIPrefix(site)+"."+api, sub.Subject, body); err != nil {
		return nil, fmt.Errorf("site %s: %s: %w", site, api, err)
	}
	m, err := sub.NextMsgWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("site %s: %s: %w", site, api, err)
	}
	var r jsAPIReply
	if err := json.Unmarshal(m.Data, &r); err != nil {
		return nil, fmt.Errorf("site %s: %s: %w", site, api, err)
	}
	return &r, nil
}

// siteMirrorConfig is the config of site's mirror of src.
func (cs *cacheStore) siteMirrorConfig(site string, src subjects.SiteSource, sc *model.SiteCache) jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:        src.Mirror,
		Description: "fleet binary cache at site " + site + ": a mirror of the hub's " + src.Stream,
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardOld,
		MaxBytes:    sc.MaxBytes,
		MaxAge:      time.Duration(sc.MaxAge),
		AllowDirect: true,
		Mirror: &jetstream.StreamSource{
			Name:     src.Stream,
			External: &jetstream.ExternalStream{APIPrefix: subjects.SiteHubAPI},
			Consumer: &jetstream.StreamConsumerSource{Name: subjects.SiteCacheConsumer(site, src.Kind), DeliverSubject: subjects.SiteCacheDeliver(site, src.Kind)},
		},
	}
}

// ensureSiteMirror creates site's two mirrors when they do not exist and
// updates their bounds when they changed.
func (cs *cacheStore) ensureSiteMirror(ctx context.Context, site string, sc *model.SiteCache, from time.Time) error {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	nc, err := cs.siteConn(cctx, site, from)
	cancel()
	if err != nil {
		return err
	}
	for _, src := range subjects.SiteSources() {
		want := cs.siteMirrorConfig(site, src, sc)
		info, err := cs.siteRequest(ctx, nc, site, "STREAM.INFO."+src.Mirror, nil)
		if err != nil {
			return err
		}
		verb := ""
		switch {
		case info.Error != nil && info.Error.ErrCode == jsErrStreamNotFound:
			verb = "CREATE"
		case info.Error != nil:
			return fmt.Errorf("site %s: %s: %s", site, src.Mirror, info.Error.Description)
		case info.Config != nil && (info.Config.MaxBytes != want.MaxBytes || info.Config.MaxAge != want.MaxAge):
			verb = "UPDATE"
		}
		if verb == "" {
			continue
		}
		body, _ := json.Marshal(want)
		r, err := cs.siteRequest(ctx, nc, site, "STREAM."+verb+"."+src.Mirror, body)
		if err != nil {
			return err
		}
		if r.Error != nil {
			return fmt.Errorf("site %s: %s %s: %s", site, strings.ToLower(verb), src.Mirror, r.Error.Description)
		}
		cs.log.Info().Str("site", site).Str("stream", src.Mirror).Int64("max_bytes", sc.MaxBytes).Dur("max_age", time.Duration(sc.MaxAge)).Msg("site cache: mirror " + strings.ToLower(verb) + "d")
	}
	return nil
}
