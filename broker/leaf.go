package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"fleet/model"
	"fleet/subjects"
)

// checkLeafSite refuses a name no leaf site may have.
func checkLeafSite(site string) error {
	if !subjects.ValidSite(site) || site == subjects.DefaultSite {
		return badRequest("site %q: use lower-case letters, digits and - (e.g. berlin), not %q (the hub's own)", site, subjects.DefaultSite)
	}
	return nil
}

// leafConfig issues a site's leaf credential and hands out what a standard
// nats-server needs to trust this fleet's operator and accounts.
func (s *services) leafConfig(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.LeafConfigRequest
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	if err := checkLeafSite(a.Site); err != nil {
		return nil, err
	}
	if !nkeys.IsValidPublicUserKey(a.Key) {
		return nil, badRequest("%q is not an nkey user public key", a.Key)
	}
	auth := s.c.auth
	// The site tag scopes the link to its own devices' inboxes.
	tok, err := auth.IssueSiteUser(subjects.RoleLeaf, a.Key, "leaf-"+a.Site, a.Site, 0)
	if err != nil {
		return nil, badRequest("%v", err)
	}
	var sysTok string
	if a.SystemKey != "" {
		if sysTok, err = auth.IssueSiteSystemUser(a.SystemKey, "leaf-"+a.Site+"-system"); err != nil {
			return nil, badRequest("%v", err)
		}
	}
	sysJWT, fleetJWT, err := auth.AccountJWTs()
	if err != nil {
		return nil, err
	}
	// FLEET imports from CORE (the cache's direct gets): a leaf that
	// cannot resolve CORE says so at every start, so it always gets it.
	coreJWT, err := auth.CoreJWT()
	if err != nil {
		return nil, err
	}
	lc := model.LeafConfig{
		Site: a.Site, JWT: tok, SystemUserJWT: sysTok, OperatorJWT: auth.OperatorJWT,
		SystemAccount: auth.SystemAccount(), SystemJWT: sysJWT,
		FleetAccount: auth.FleetAccount(), FleetJWT: fleetJWT,
		CoreAccount: auth.CoreAccount(), CoreJWT: coreJWT,
		HubURL: s.c.LeafURL(), Domain: s.c.cfg.Domain,
	}
	if a.Cache != nil {
		if err := s.siteCacheConfig(ctx, a.Site, a.Cache, &lc); err != nil {
			return nil, err
		}
	}
	return lc, nil
}

// siteCacheConfig sets up site's copy of the binary cache: its consumers
// on the hub's cache streams, its link account and the JWT of its cache
// link.
func (s *services) siteCacheConfig(ctx context.Context, site string, sc *model.SiteCache, lc *model.LeafConfig) error {
	if s.cache == nil {
		return refused("this coordinator serves no binary cache")
	}
	if !nkeys.IsValidPublicUserKey(sc.Key) {
		return badRequest("%q is not an nkey user public key", sc.Key)
	}
	if site == s.c.cfg.Domain {
		return badRequest("site %q: the site's JetStream domain is its name, and %q is the hub's", site, site)
	}
	if err := checkSiteCache(sc); err != nil {
		return err
	}
	// A site has one cache link, the last issued: its account revokes
	// every link issued before this second (a thief's copy of an earlier
	// leaf-cache.creds is cut off, and its slots freed).
	from := time.Now().Truncate(time.Second) // the JWTs' clock, not a test's
	auth := s.c.auth
	tok, err := auth.IssueSiteCacheUser(sc.Key, site)
	if err != nil {
		return badRequest("%v", err)
	}
	if err := s.setupSiteConsumers(ctx, site, sc, from, false); err != nil {
		return err
	}
	// The link's account must exist before the site dials in with it.
	if _, err := s.cache.siteConn(ctx, site, from); err != nil {
		return err
	}
	lc.CacheUserJWT = tok
	s.cache.kickSites()
	return nil
}

// leafRevoke cuts a site's leaf links off: every cache link it was issued
// (its link account revokes them all; its copy is no longer fed) and the
// FLEET leaf links whose keys are named. A key must be no device's and no
// admin's: those have commands of their own.
func (s *services) leafRevoke(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.LeafRevoke
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	if err := checkLeafSite(a.Site); err != nil {
		return nil, err
	}
	if len(a.Keys) > 64 {
		return nil, badRequest("%d keys: at most 64 at once", len(a.Keys))
	}
	for _, k := range a.Keys {
		if !nkeys.IsValidPublicUserKey(k) {
			return nil, badRequest("%q is not an nkey user public key (leaf config prints the leaf's key)", k)
		}
		switch _, err := s.admins.Get(ctx, k); {
		case err == nil:
			return nil, refused("%s is an admin's key: use fleet-admin admin remove", k)
		case !errors.Is(err, jetstream.ErrKeyNotFound):
			return nil, fmt.Errorf("is %s an admin's key: %w", k, err)
		}
		switch d, err := s.knownDevice(ctx, k); {
		case err == nil && d != nil:
			return nil, refused("%s is device %s: use fleet-admin devices revoke", k, d.Name)
		case err != nil && !isNotFound(err):
			return nil, fmt.Errorf("is %s a device's key: %w", k, err)
		}
	}
	out := model.LeafRevoked{Site: a.Site, Keys: a.Keys, At: time.Now().UTC()}
	if s.cache != nil {
		had, err := s.cache.revokeSiteLinks(ctx, a.Site)
		if err != nil {
			return nil, err
		}
		out.CacheLinks = had
	}
	if !out.CacheLinks && len(a.Keys) == 0 {
		return nil, badRequest("site %s has no copy of the cache: name its leaf's key (--key) to revoke its link", a.Site)
	}
	if len(a.Keys) > 0 {
		if err := s.c.RevokeAt(ctx, out.At, a.Keys...); err != nil {
			return nil, fmt.Errorf("revoke the leaf links of %s: %w", a.Site, err)
		}
	}
	return out, nil
}
