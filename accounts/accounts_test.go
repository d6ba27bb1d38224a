package accounts

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"

	"fleet/internal/dirstate"
	"fleet/subjects"
)

func create(t *testing.T) (string, *Authority) {
	t.Helper()
	return createWith(t, DefaultLimits)
}

func createWith(t *testing.T, limits Limits) (string, *Authority) {
	t.Helper()
	dir := t.TempDir()
	a, err := Create(dir, subjects.Domain, limits)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	return dir, a
}

func wantErr(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want one naming %q", parts)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not mention %q", err, p)
		}
	}
}

func TestCreateLoad(t *testing.T) {
	dir, a := create(t)
	if !Initialized(dir) {
		t.Fatal("Initialized = false after Create")
	}
	if Initialized(t.TempDir()) {
		t.Fatal("Initialized = true for an empty dir")
	}
	// Secrets are private.
	for p := range dirstate.Take(t, dir) {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s has mode %v, want no group/other access", p, st.Mode().Perm())
		}
	}
	oc, err := jwt.DecodeOperatorClaims(a.OperatorJWT)
	if err != nil {
		t.Fatal(err)
	}
	if !oc.StrictSigningKeyUsage || oc.SystemAccount != a.SystemAccount() || oc.Subject != a.OperatorPublicKey() {
		t.Errorf("operator claims: %+v", oc.Operator)
	}
	sys, fleet, err := a.AccountJWTs()
	if err != nil {
		t.Fatal(err)
	}
	fc, err := jwt.DecodeAccountClaims(fleet)
	if err != nil {
		t.Fatal(err)
	}
	if fc.Subject != a.FleetAccount() || fc.Name != subjects.AccountFleet || !oc.SigningKeys.Contains(fc.Issuer) {
		t.Errorf("FLEET account claims: sub %s name %s issuer %s", fc.Subject, fc.Name, fc.Issuer)
	}
	if fc.Issuer == oc.Subject {
		t.Error("FLEET account signed by the operator identity key; strict signing wants a signing key")
	}
	// FLEET holds the clients and stores nothing.
	if fc.Limits.Payload != DefaultLimits.MaxPayload || fc.Limits.Conn != DefaultLimits.Connections || fc.Limits.LeafNodeConn != -1 {
		t.Errorf("FLEET limits not applied: %+v", fc.Limits.NatsLimits)
	}
	if fc.Limits.JetStreamLimits != (jwt.JetStreamLimits{}) || fc.Limits.IsJSEnabled() || len(fc.Limits.JetStreamTieredLimits) != 0 {
		t.Errorf("FLEET has JetStream: %+v", fc.Limits.JetStreamLimits)
	}
	siteCacheSharing(t, a, fc, false)
	checkScopes(t, a, fc)
	fleetSvc, err := ReadSeed(filepath.Join(dir, KeysDir, fleetServiceFile), nkeys.PrefixByteAccount)
	if err != nil {
		t.Fatal(err)
	}
	if sk, ok := fc.SigningKeys.GetScope(mustPub(fleetSvc)); !ok || sk != nil {
		t.Errorf("FLEET's service key is not an unscoped signing key (%v, %v)", sk, ok)
	}
	if len(fc.SigningKeys) != len(subjects.Roles)+1 {
		t.Errorf("FLEET has %d signing keys, want one per role and the service key", len(fc.SigningKeys))
	}

	// CORE holds the state: JetStream within the limits, leaf links only
	// of sites' cache mirrors, one unscoped signing key that only the
	// coordinator holds.
	coreJWT, err := a.CoreJWT()
	if err != nil {
		t.Fatal(err)
	}
	cc, err := jwt.DecodeAccountClaims(coreJWT)
	if err != nil {
		t.Fatal(err)
	}
	if cc.Subject != a.CoreAccount() || cc.Name != subjects.AccountCore || !oc.SigningKeys.Contains(cc.Issuer) || cc.Issuer == oc.Subject {
		t.Errorf("CORE account claims: sub %s name %s issuer %s", cc.Subject, cc.Name, cc.Issuer)
	}
	if a.CoreAccount() == a.FleetAccount() || a.CoreAccount() == a.SystemAccount() {
		t.Error("CORE is not an account of its own")
	}
	if DefaultLimits.JetStreamDisk != 20<<30 {
		t.Errorf("default JetStream disk = %d, want 20 GiB", DefaultLimits.JetStreamDisk)
	}
	js := cc.Limits.JetStreamLimits
	if js.DiskStorage != DefaultLimits.JetStreamDisk || js.MemoryStorage != DefaultLimits.JetStreamMemory || !cc.Limits.IsJSEnabled() {
		t.Errorf("CORE JetStream limits %+v, want disk %d memory %d", js, DefaultLimits.JetStreamDisk, DefaultLimits.JetStreamMemory)
	}
	if cc.Limits.Payload != DefaultLimits.MaxPayload || cc.Limits.Conn <= 0 {
		t.Errorf("CORE limits %+v: want bounded connections", cc.Limits.NatsLimits)
	}
	siteCacheSharing(t, a, cc, true)
	berlin, paris := siteLinkAccount(t, a, oc, "berlin"), siteLinkAccount(t, a, oc, "paris")
	if berlin.Subject == paris.Subject || berlin.SigningKeys.Keys()[0] == paris.SigningKeys.Keys()[0] {
		t.Error("two sites share a link account or its signing key")
	}
	for _, bad := range []string{"", subjects.DefaultSite, "Berlin", "a.b", "*", ">"} {
		if _, err := a.IssueSiteCacheUser(mustPub(newUserKey(t)), bad); err == nil {
			t.Errorf("a cache link for site %q", bad)
		}
		if _, err := a.SiteLinkJWT(bad, time.Time{}); err == nil {
			t.Errorf("a link account for site %q", bad)
		}
	}
	coreSvc, err := ReadSeed(filepath.Join(dir, KeysDir, coreServiceFile), nkeys.PrefixByteAccount)
	if err != nil {
		t.Fatal(err)
	}
	// One key, scoped to the coordinators' own client and in-process
	// connections: no CORE user is a leaf link, whatever its JWT says.
	sk, ok := cc.SigningKeys.GetScope(mustPub(coreSvc))
	us, scoped := sk.(*jwt.UserScope)
	if !ok || !scoped || len(cc.SigningKeys) != 1 || !us.Template.Permissions.Pub.Empty() || !us.Template.Permissions.Sub.Empty() ||
		!slices.Equal(us.Template.AllowedConnectionTypes, jwt.StringList{jwt.ConnectionTypeStandard, jwt.ConnectionTypeInProcess}) {
		t.Errorf("CORE signing keys %v (%+v), want only %s, scoped to the coordinators' connections", cc.SigningKeys.Keys(), sk, coreServiceFile)
	}
	cu, err := a.CoreUser("c")
	if err != nil {
		t.Fatal(err)
	}
	if uc, err := cu.Claims(); err != nil || !uc.HasEmptyPermissions() || us.ValidateScopedSigner(uc) != nil {
		t.Errorf("a coordinator's CORE user: %v", err)
	}
	onDisk, err := os.ReadFile(filepath.Join(dir, ResolverDir, a.CoreAccount()+".jwt"))
	if err != nil {
		t.Fatalf("CORE account JWT not in the resolver dir: %v", err)
	}
	if dc, err := jwt.DecodeAccountClaims(string(onDisk)); err != nil || dc.Subject != a.CoreAccount() {
		t.Errorf("resolver's CORE JWT: %v", err)
	}

	sysSvc, err := ReadSeed(filepath.Join(dir, KeysDir, systemServiceFile), nkeys.PrefixByteAccount)
	if err != nil {
		t.Fatal(err)
	}
	// The coordinator's own users: CORE's, FLEET's service user, SYS's,
	// each signed by its account's unscoped key.
	for name, c := range map[string]struct {
		mk     func(string) (*Creds, error)
		acc    string
		signer nkeys.KeyPair
	}{
		"core":    {a.CoreUser, a.CoreAccount(), coreSvc},
		"service": {a.ServiceUser, a.FleetAccount(), fleetSvc},
		"system":  {a.SystemUser, a.SystemAccount(), sysSvc},
	} {
		cr, err := c.mk("x-" + name)
		if err != nil {
			t.Fatal(err)
		}
		uc, err := cr.Claims()
		if err != nil {
			t.Fatal(err)
		}
		if uc.IssuerAccount != c.acc || uc.Name != "x-"+name || uc.Issuer != mustPub(c.signer) {
			t.Errorf("%s user: issuer %s/%s", name, uc.Issuer, uc.IssuerAccount)
		}
		if r, ok := a.RoleOf(uc); ok {
			t.Errorf("%s user has role %s", name, r)
		}
	}

	sc, err := jwt.DecodeAccountClaims(sys)
	if err != nil || sc.Subject != a.SystemAccount() {
		t.Fatalf("system account JWT: %v", err)
	}
	// The operator identity seed lives apart from the running keys.
	opSeed, err := ReadSeed(filepath.Join(dir, OperatorSeedFile), nkeys.PrefixByteOperator)
	if err != nil {
		t.Fatal(err)
	}
	if pub, _ := opSeed.PublicKey(); pub != a.OperatorPublicKey() {
		t.Errorf("operator.nk holds %s, operator is %s", pub, a.OperatorPublicKey())
	}
	if _, err := os.Stat(filepath.Join(dir, KeysDir, OperatorSeedFile)); err == nil {
		t.Error("operator identity seed also in keys/")
	}
	// The first owner.
	owner, err := ReadCreds(filepath.Join(dir, AdminCredsFile))
	if err != nil {
		t.Fatal(err)
	}
	uc, _ := owner.Claims()
	if r, ok := a.RoleOf(uc); !ok || r != subjects.RoleOwner {
		t.Errorf("admin.creds role = %q, %v; want owner", r, ok)
	}

	// Load sees the same identity, and works without the operator seed.
	if err := os.Remove(filepath.Join(dir, OperatorSeedFile)); err != nil {
		t.Fatal(err)
	}
	b, err := Load(dir, subjects.Domain, DefaultLimits)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if b.OperatorPublicKey() != a.OperatorPublicKey() || b.FleetAccount() != a.FleetAccount() || b.CoreAccount() != a.CoreAccount() ||
		b.SystemAccount() != a.SystemAccount() || b.OperatorJWT != a.OperatorJWT {
		t.Error("Load returned another identity")
	}
	for _, r := range subjects.Roles {
		if a.RoleKey(r) != b.RoleKey(r) {
			t.Errorf("role %s key changed across Load", r)
		}
	}
	if r, ok := b.RoleOf(uc); !ok || r != subjects.RoleOwner {
		t.Errorf("loaded authority: admin.creds role = %q, %v", r, ok)
	}
	for i := range 2 {
		if changed, err := b.Refresh(); err != nil || changed {
			t.Errorf("Refresh %d of an unchanged dir = %v, %v; want false, nil", i+1, changed, err)
		}
	}
	if changed, err := a.Refresh(); err != nil || changed {
		t.Errorf("Refresh right after Create = %v, %v; want false, nil", changed, err)
	}
	if b.ResolverPath() != filepath.Join(dir, ResolverDir) || b.Domain() != subjects.Domain {
		t.Errorf("ResolverPath %s Domain %s", b.ResolverPath(), b.Domain())
	}
}

// siteCacheSharing checks that CORE (core) exports and FLEET imports
// exactly the direct gets of the cache (the coordinator's of the hub's
// NAR files, and a site's mirrors), as services, and nothing else; CORE
// exports besides only what sites' link accounts import.
func siteCacheSharing(t *testing.T, a *Authority, c *jwt.AccountClaims, core bool) {
	t.Helper()
	want := map[string]string{
		"$JS.API.DIRECT.GET." + subjects.ObjectStream(subjects.ObjectCache):                          subjects.CacheDirect,
		"$JS.API.DIRECT.GET." + subjects.StreamSiteCache:                                             subjects.SiteNar,
		"$JS.API.DIRECT.GET." + subjects.StreamSiteNarInfo + ".$KV." + subjects.BucketNarInfo + ".*": subjects.SiteNarInfo + ".*",
	}
	if core {
		link := map[string]jwt.ExportType{}
		for _, im := range subjects.SiteLinkImports("*") {
			link[im.Subject] = map[bool]jwt.ExportType{true: jwt.Service, false: jwt.Stream}[im.Service]
		}
		n := len(want) + len(link)
		if len(c.Imports) != 0 || c.Limits.Imports != 0 || len(c.Exports) != n || c.Limits.Exports != int64(n) {
			t.Fatalf("CORE shares: imports %v exports %d limits %+v", c.Imports, len(c.Exports), c.Limits.AccountLimits)
		}
		for _, e := range c.Exports {
			_, cache := want[string(e.Subject)]
			typ, linked := link[string(e.Subject)]
			if !(cache && e.Type == jwt.Service || linked && e.Type == typ) || e.TokenReq {
				t.Errorf("CORE exports %+v", e)
			}
			// No export reaches a bucket, a stream's own subjects or the
			// JetStream API beyond the cache's direct gets and the sites'
			// consumer resets.
			sub := string(e.Subject)
			if strings.HasPrefix(sub, "$KV.") || strings.HasPrefix(sub, "$O.") || strings.HasPrefix(sub, "$JS.API.") &&
				!strings.HasPrefix(sub, "$JS.API.DIRECT.GET.") && !strings.HasPrefix(sub, "$JS.API.CONSUMER.RESET.") {
				t.Errorf("CORE exports %s", sub)
			}
		}
		return
	}
	if len(c.Exports) != 0 || c.Limits.Exports != 0 || c.Limits.WildcardExports || len(c.Imports) != len(want) || c.Limits.Imports != int64(len(want)) {
		t.Fatalf("FLEET shares: imports %d exports %v limits %+v", len(c.Imports), c.Exports, c.Limits.AccountLimits)
	}
	for _, im := range c.Imports {
		if local, ok := want[string(im.Subject)]; !ok || string(im.LocalSubject) != local || im.Type != jwt.Service || im.Account != a.CoreAccount() {
			t.Errorf("FLEET imports %+v", im)
		}
	}
}

// siteLinkAccount checks site's link account: its own account, signed by
// the operator's signing key, no JetStream, no exports, imports of CORE
// only subjects.SiteLinkImports(site), one unscoped signing key that
// issues the site's cache link (held to its template) and the
// coordinator's users.
func siteLinkAccount(t *testing.T, a *Authority, oc *jwt.OperatorClaims, site string) *jwt.AccountClaims {
	t.Helper()
	tok, err := a.SiteLinkJWT(site, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	lc, err := jwt.DecodeAccountClaims(tok)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := a.SiteLinkAccount(site)
	if err != nil {
		t.Fatal(err)
	}
	if lc.Subject != pub || lc.Name != subjects.SiteLinkAccountName(site) || !oc.SigningKeys.Contains(lc.Issuer) {
		t.Errorf("%s link account claims: sub %s name %s issuer %s", site, lc.Subject, lc.Name, lc.Issuer)
	}
	for _, other := range []string{a.CoreAccount(), a.FleetAccount(), a.SystemAccount()} {
		if other == pub {
			t.Fatalf("%s's link is not an account of its own", site)
		}
	}
	if lc.Limits.IsJSEnabled() || len(lc.Exports) != 0 || lc.Limits.Exports != 0 || lc.Limits.LeafNodeConn <= 0 {
		t.Errorf("%s link limits %+v exports %v", site, lc.Limits, lc.Exports)
	}
	want := subjects.SiteLinkImports(site)
	if len(lc.Imports) != len(want) || lc.Limits.Imports != int64(len(want)) {
		t.Fatalf("%s link imports %d, want %d", site, len(lc.Imports), len(want))
	}
	for _, im := range lc.Imports {
		i := slices.IndexFunc(want, func(w subjects.LinkImport) bool { return w.Subject == string(im.Subject) })
		if i < 0 || im.Account != a.CoreAccount() || (im.Type == jwt.Service) != want[i].Service || strings.Contains(string(im.Subject), "*."+subjects.SiteCacheObj) {
			t.Errorf("%s link imports %+v", site, im)
			continue
		}
		if !strings.Contains(string(im.Subject), site) {
			t.Errorf("%s link imports %s, not its own", site, im.Subject)
		}
		local := string(im.LocalSubject)
		if local == "" {
			local = string(im.Subject)
		}
		if local != want[i].Local {
			t.Errorf("%s link imports %s as %s, want %s", site, im.Subject, local, want[i].Local)
		}
	}
	if len(lc.SigningKeys) != 1 {
		t.Errorf("%s link signing keys %v", site, lc.SigningKeys.Keys())
	}
	ut, err := a.IssueSiteCacheUser(mustPub(newUserKey(t)), site)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := jwt.DecodeUserClaims(ut)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := subjects.SiteCacheTemplate(site)
	if uc.IssuerAccount != pub || !lc.SigningKeys.Contains(uc.Issuer) || !slices.Equal(uc.Pub.Allow, tmpl.Pub) ||
		!slices.Equal(uc.Sub.Allow, tmpl.Sub) || !slices.Equal(uc.AllowedConnectionTypes, tmpl.ConnTypes) {
		t.Errorf("%s's cache link: %+v", site, uc)
	}
	return lc
}

// checkScopes checks that every role's scoped key in the FLEET claims fc
// carries exactly its template: the permissions, no response permission
// (no role answers requests), the per-connection limits (-1 where the
// template sets none), the bearer flag and the connection types.
func checkScopes(t *testing.T, a *Authority, fc *jwt.AccountClaims) {
	t.Helper()
	orUnlimited := func(v int64) int64 {
		if v == 0 {
			return -1
		}
		return v
	}
	bounded := 0
	for _, r := range subjects.Roles {
		sk, ok := fc.SigningKeys.GetScope(a.RoleKey(r))
		if !ok || sk == nil {
			t.Fatalf("role %s has no scoped signing key in the account", r)
		}
		us, ok := sk.(*jwt.UserScope)
		if !ok {
			t.Fatalf("role %s: scope is a %T", r, sk)
		}
		want := subjects.RoleTemplate(r)
		tp := us.Template
		if us.Role != string(r) || us.Key != a.RoleKey(r) || !slices.Equal(tp.Pub.Allow, want.Pub) || !slices.Equal(tp.Sub.Allow, want.Sub) ||
			len(tp.Pub.Deny)+len(tp.Sub.Deny) != 0 || tp.BearerToken != want.Bearer || !slices.Equal(tp.AllowedConnectionTypes, want.ConnTypes) {
			t.Errorf("role %s scope %+v does not match its template %+v", r, tp, want)
		}
		if tp.Resp != nil {
			t.Errorf("role %s may answer requests: %+v", r, tp.Resp)
		}
		if tp.Limits.Subs != orUnlimited(want.MaxSubs) || tp.Limits.Payload != orUnlimited(want.MaxPayload) || tp.Limits.Data != -1 {
			t.Errorf("role %s limits %+v, want subs %d payload %d", r, tp.Limits.NatsLimits, want.MaxSubs, want.MaxPayload)
		}
		if want.MaxSubs > 0 {
			bounded++
		}
	}
	if bounded == 0 {
		t.Error("no role's subscriptions are bounded")
	}
}

func TestCreateRefusesInitialisedDir(t *testing.T) {
	dir, _ := create(t)
	before := dirstate.Take(t, dir)
	_, err := Create(dir, subjects.Domain, DefaultLimits)
	wantErr(t, err, dir, "already")
	dirstate.Unchanged(t, before, dirstate.Take(t, dir))

	// Each of the files alone blocks a new Create.
	for _, f := range []string{OperatorJWTFile, OperatorSeedFile, AdminCredsFile, KeysDir, ResolverDir} {
		t.Run(f, func(t *testing.T) {
			d := t.TempDir()
			p := filepath.Join(d, f)
			if err := os.WriteFile(p, []byte("keep me"), 0o600); err != nil {
				t.Fatal(err)
			}
			before := dirstate.Take(t, d)
			_, err := Create(d, subjects.Domain, DefaultLimits)
			wantErr(t, err, p)
			dirstate.Unchanged(t, before, dirstate.Take(t, d))
		})
	}
}

func TestLoadDamagedDir(t *testing.T) {
	dir0, a := create(t)
	keys := filepath.Join(dir0, KeysDir)
	fleetJWT := filepath.Join(dir0, ResolverDir, a.FleetAccount()+".jwt")
	sysJWT := filepath.Join(dir0, ResolverDir, a.SystemAccount()+".jwt")
	coreJWT := filepath.Join(dir0, ResolverDir, a.CoreAccount()+".jwt")
	otherDir, other := create(t)
	_ = other

	userSeed := func() []byte {
		kp, _ := nkeys.CreateUser()
		s, _ := kp.Seed()
		return s
	}
	type damage struct {
		name  string
		file  string // relative to the dir
		apply func(t *testing.T, p string)
		want  []string
	}
	remove := func(t *testing.T, p string) {
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
	}
	write := func(b []byte) func(t *testing.T, p string) {
		return func(t *testing.T, p string) {
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	copyFrom := func(src string) func(t *testing.T, p string) {
		return func(t *testing.T, p string) {
			b, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			write(b)(t, p)
		}
	}
	rel := func(p string) string { r, _ := filepath.Rel(dir0, p); return r }
	_, fleetOfOther, _ := other.AccountJWTs()
	cases := []damage{
		{"operator jwt missing", OperatorJWTFile, remove, []string{"missing", "init"}},
		{"operator jwt garbage", OperatorJWTFile, write([]byte("garbage\n")), []string{"damaged"}},
		{"operator jwt of another fleet", OperatorJWTFile, copyFrom(filepath.Join(otherDir, OperatorJWTFile)), []string{"mixed up"}},
		{"fleet account jwt missing", rel(fleetJWT), remove, []string{"missing"}},
		{"fleet account jwt garbage", rel(fleetJWT), write([]byte("eyJhbGciOi.garbage.x")), []string{"damaged"}},
		{"fleet account jwt truncated", rel(fleetJWT), func(t *testing.T, p string) {
			b, _ := os.ReadFile(p)
			write(b[:len(b)/2])(t, p)
		}, []string{"damaged"}},
		{"fleet account jwt of another fleet", rel(fleetJWT), write([]byte(fleetOfOther)), []string{}},
		{"system account jwt missing", rel(sysJWT), remove, []string{"missing"}},
		{"system account jwt garbage", rel(sysJWT), write([]byte("garbage")), []string{"damaged"}},
		{"system account jwt holds the fleet account", rel(sysJWT), copyFrom(fleetJWT), []string{}},
		{"core account jwt missing", rel(coreJWT), remove, []string{"missing"}},
		{"core account jwt garbage", rel(coreJWT), write([]byte("garbage")), []string{"damaged"}},
		{"core account jwt holds the fleet account", rel(coreJWT), copyFrom(fleetJWT), []string{"mixed up"}},
		// A data dir from before the CORE account: its key is missing.
		{"data dir without a CORE account", filepath.Join(KeysDir, coreSeedFile), remove, []string{"missing", "CORE", "init a new one"}},
	}
	for _, f := range []string{fleetServiceFile, coreServiceFile, roleSeedFile(subjects.RoleAgent), roleSeedFile(subjects.RoleEnroll), roleSeedFile(subjects.RolePending)} {
		p := filepath.Join(KeysDir, f)
		cases = append(cases, damage{"key of another fleet " + f, p, copyFrom(filepath.Join(otherDir, p)), []string{"mixed up"}})
	}
	for _, f := range []string{operatorSigningFile, systemSeedFile, fleetSeedFile, fleetServiceFile, systemServiceFile,
		coreSeedFile, coreServiceFile, roleSeedFile(subjects.RoleAgent), roleSeedFile(subjects.RoleOwner), roleSeedFile(subjects.RolePending)} {
		p := filepath.Join(KeysDir, f)
		cases = append(cases,
			damage{"key missing " + f, p, remove, []string{"missing"}},
			damage{"key garbage " + f, p, write([]byte("not a seed\n")), []string{}},
			damage{"key empty " + f, p, write(nil), []string{}},
			damage{"key of wrong kind " + f, p, write(userSeed()), []string{}},
		)
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.CopyFS(dir, os.DirFS(dir0)); err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(dir, c.file)
			c.apply(t, p)
			before := dirstate.Take(t, dir)
			b, err := Load(dir, subjects.Domain, DefaultLimits)
			if err == nil {
				t.Fatalf("Load of a dir with %s succeeded (%v)", c.name, b != nil)
			}
			wantErr(t, err, append([]string{p}, c.want...)...)
			dirstate.Unchanged(t, before, dirstate.Take(t, dir))
		})
	}
	_ = keys
}

func TestIssueUser(t *testing.T) {
	_, a := create(t)
	for _, r := range subjects.Roles {
		if r == subjects.RoleLeaf {
			// A leaf link always names its site (TestIssueSiteUser).
			if _, err := a.NewUser(r, "u-leaf", time.Hour); err == nil {
				t.Error("NewUser(leaf) without a site succeeded")
			}
			continue
		}
		c, err := a.NewUser(r, "u-"+string(r), time.Hour)
		if err != nil {
			t.Fatalf("NewUser(%s): %v", r, err)
		}
		uc, err := c.Claims()
		if err != nil {
			t.Fatal(err)
		}
		if uc.Subject != c.PublicKey() || uc.Name != "u-"+string(r) || uc.IssuerAccount != a.FleetAccount() || uc.Issuer != a.RoleKey(r) {
			t.Errorf("role %s: claims sub %s name %s issuer %s/%s", r, uc.Subject, uc.Name, uc.Issuer, uc.IssuerAccount)
		}
		if !uc.HasEmptyPermissions() {
			t.Errorf("role %s: scoped user carries permissions or limits: %+v", r, uc.UserPermissionLimits)
		}
		if d := time.Until(time.Unix(uc.Expires, 0)); d < 59*time.Minute || d > 61*time.Minute {
			t.Errorf("role %s: expires in %v, want 1h", r, d)
		}
		if got, ok := a.RoleOf(uc); !ok || got != r {
			t.Errorf("RoleOf = %q, %v; want %q", got, ok, r)
		}
		if !uc.Tags.Contains("role:"+string(r)) || c.Role() != r {
			t.Errorf("role %s: tags %v, Role() %q", r, uc.Tags, c.Role())
		}
		switch r {
		case subjects.RoleAgent, subjects.RolePending, subjects.RoleEnroll:
			// A device without a site is at the hub, and says so.
			if !slices.Equal(uc.Tags, jwt.TagList{"role:" + string(r), subjects.SiteTag(subjects.DefaultSite)}) ||
				c.Site() != subjects.DefaultSite || c.InboxPrefix() != subjects.DeviceInboxPrefix(subjects.DefaultSite, c.PublicKey()) {
				t.Errorf("role %s: tags %v, site %q, inbox %q", r, uc.Tags, c.Site(), c.InboxPrefix())
			}
		case subjects.RoleLeaf:
		default:
			if !slices.Equal(uc.Tags, jwt.TagList{"role:" + string(r)}) || c.InboxPrefix() != subjects.InboxPrefix(c.PublicKey()) {
				t.Errorf("admin role %s: tags %v, inbox %q", r, uc.Tags, c.InboxPrefix())
			}
		}
	}
	noExp, err := a.NewUser(subjects.RoleAgent, "x", 0)
	if err != nil {
		t.Fatal(err)
	}
	if uc, _ := noExp.Claims(); uc.Expires != 0 {
		t.Errorf("ttl 0 gave expiry %d", uc.Expires)
	}

	// Bad input.
	user, _ := nkeys.CreateUser()
	upub, _ := user.PublicKey()
	acc, _ := nkeys.CreateAccount()
	apub, _ := acc.PublicKey()
	if _, err := a.IssueUser("root", upub, "x", 0); err == nil {
		t.Error("IssueUser with an unknown role succeeded")
	}
	for _, pub := range []string{"", "nope", apub, upub + "Q", upub[:55]} {
		if _, err := a.IssueUser(subjects.RoleAgent, pub, "x", 0); err == nil {
			t.Errorf("IssueUser for key %q succeeded", pub)
		}
	}
	// A user JWT of another fleet has no role here.
	_, other := create(t)
	oc, _ := other.NewUser(subjects.RoleOwner, "o", 0)
	ouc, _ := oc.Claims()
	if r, ok := a.RoleOf(ouc); ok {
		t.Errorf("RoleOf a foreign user = %q", r)
	}
	svc, err := a.ServiceUser("svc")
	if err != nil {
		t.Fatal(err)
	}
	suc, _ := svc.Claims()
	if r, ok := a.RoleOf(suc); ok {
		t.Errorf("RoleOf the service user = %q", r)
	}
}

func TestIssueSiteUser(t *testing.T) {
	_, a := create(t)
	kp, _ := nkeys.CreateUser()
	pub := mustPub(kp)
	issue := func(r subjects.Role, site string) (*Creds, *jwt.UserClaims, error) {
		tok, err := a.IssueSiteUser(r, pub, "u", site, time.Hour)
		if err != nil {
			return nil, nil, err
		}
		c := &Creds{JWT: tok, Key: kp}
		uc, err := c.Claims()
		if err != nil {
			t.Fatal(err)
		}
		if uc.Subject != pub || uc.IssuerAccount != a.FleetAccount() || uc.Issuer != a.RoleKey(r) || !uc.HasEmptyPermissions() {
			t.Errorf("%s@%s: claims sub %s issuer %s/%s, permissions %+v", r, site, uc.Subject, uc.Issuer, uc.IssuerAccount, uc.UserPermissionLimits)
		}
		return c, uc, nil
	}
	siteTags := func(uc *jwt.UserClaims) (sites []string) {
		for _, tag := range uc.Tags {
			if v, ok := strings.CutPrefix(tag, "site:"); ok {
				sites = append(sites, v)
			}
		}
		return sites
	}

	// Device-side users carry their site; "" and "hub" are the hub.
	for _, r := range []subjects.Role{subjects.RoleAgent, subjects.RolePending, subjects.RoleEnroll} {
		for site, want := range map[string]string{"berlin": "berlin", "": subjects.DefaultSite, subjects.DefaultSite: subjects.DefaultSite, "a-1": "a-1"} {
			c, uc, err := issue(r, site)
			if err != nil {
				t.Fatalf("%s@%q: %v", r, site, err)
			}
			if got := siteTags(uc); !slices.Equal(got, []string{want}) || !uc.Tags.Contains("role:"+string(r)) {
				t.Errorf("%s@%q: tags %v, want site %s", r, site, uc.Tags, want)
			}
			if c.Role() != r || c.Site() != want || c.InboxPrefix() != subjects.DeviceInboxPrefix(want, pub) {
				t.Errorf("%s@%q: Role %q Site %q InboxPrefix %q", r, site, c.Role(), c.Site(), c.InboxPrefix())
			}
		}
	}

	// A leaf link is its site's; the hub is no leaf's site.
	c, uc, err := issue(subjects.RoleLeaf, "berlin")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(siteTags(uc), []string{"berlin"}) || c.Role() != subjects.RoleLeaf || c.Site() != "berlin" {
		t.Errorf("leaf@berlin: tags %v", uc.Tags)
	}
	if _, _, err := issue(subjects.RoleLeaf, subjects.DefaultSite); err == nil {
		t.Error("a leaf credential for the hub's own site was issued")
	} else {
		wantErr(t, err, subjects.DefaultSite)
	}

	// Admins have no site.
	for _, r := range subjects.AdminRoles {
		for _, site := range []string{"berlin", subjects.DefaultSite} {
			if _, _, err := issue(r, site); err == nil {
				t.Errorf("admin role %s issued with site %q", r, site)
			} else {
				wantErr(t, err, string(r), "site")
			}
		}
		if _, uc, err := issue(r, ""); err != nil || len(siteTags(uc)) != 0 {
			t.Errorf("admin role %s without a site: %v", r, err)
		}
	}

	// A site is one plain token, lower case: it is written into subjects.
	for _, site := range []string{"Berlin", "a.b", "*", ">", "-x", "a b", "a\nb", "a_b", "ber:lin", strings.Repeat("a", 64)} {
		for _, r := range []subjects.Role{subjects.RoleAgent, subjects.RoleEnroll, subjects.RoleLeaf} {
			if _, _, err := issue(r, site); err == nil {
				t.Errorf("%s issued with site %q", r, site)
			} else {
				wantErr(t, err, fmt.Sprintf("%q", site))
			}
		}
	}
	if _, err := a.IssueSiteUser("root", pub, "x", "berlin", 0); err == nil {
		t.Error("IssueSiteUser with an unknown role succeeded")
	}
	if _, err := a.IssueSiteUser(subjects.RoleAgent, pub[:55], "x", "berlin", 0); err == nil {
		t.Error("IssueSiteUser with a bad key succeeded")
	}
}

// Creds read role and site from the JWT's tags; a JWT without them is an
// admin-style user at the hub.
func TestCredsTags(t *testing.T) {
	_, a := create(t)
	svc, err := a.ServiceUser("svc")
	if err != nil {
		t.Fatal(err)
	}
	if svc.Role() != "" || svc.Site() != subjects.DefaultSite || svc.InboxPrefix() != subjects.InboxPrefix(svc.PublicKey()) {
		t.Errorf("untagged creds: role %q site %q inbox %q", svc.Role(), svc.Site(), svc.InboxPrefix())
	}
	broken := &Creds{JWT: "not a jwt", Key: svc.Key}
	if broken.Role() != "" || broken.Site() != subjects.DefaultSite {
		t.Errorf("creds with a broken JWT: role %q site %q", broken.Role(), broken.Site())
	}
	kp, _ := nkeys.CreateUser()
	tok, err := a.IssueSiteUser(subjects.RolePending, mustPub(kp), "p", "site-7", 0)
	if err != nil {
		t.Fatal(err)
	}
	p := &Creds{JWT: tok, Key: kp}
	if p.Role() != subjects.RolePending || p.Site() != "site-7" || p.InboxPrefix() != subjects.DeviceInboxPrefix("site-7", mustPub(kp)) {
		t.Errorf("pending creds: role %q site %q inbox %q", p.Role(), p.Site(), p.InboxPrefix())
	}
	// The tags survive the .creds file.
	b, err := p.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	back, err := ParseCreds(b, "p.creds")
	if err != nil || back.Site() != "site-7" || back.Role() != subjects.RolePending {
		t.Errorf("creds round trip: %v, site %q", err, back.Site())
	}
}

func TestRefresh(t *testing.T) {
	dir, a := create(t)
	fleetPath := filepath.Join(dir, ResolverDir, a.FleetAccount()+".jwt")
	corePath := filepath.Join(dir, ResolverDir, a.CoreAccount()+".jwt")
	read := func(p string) string {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}

	// Only CORE's storage changed: CORE is re-signed, FLEET is not.
	fleetBefore, coreBefore := read(fleetPath), read(corePath)
	bigger := DefaultLimits
	bigger.JetStreamDisk = 40 << 30
	l, err := Load(dir, subjects.Domain, bigger)
	if err != nil {
		t.Fatal(err)
	}
	if changed, err := l.Refresh(); err != nil || !changed {
		t.Fatalf("Refresh with a new disk limit = %v, %v; want true", changed, err)
	}
	if read(fleetPath) != fleetBefore {
		t.Error("FLEET re-signed for a CORE-only change")
	}
	if read(corePath) == coreBefore {
		t.Error("CORE JWT in the resolver dir not updated")
	}
	tok, err := l.CoreJWT()
	if err != nil {
		t.Fatal(err)
	}
	cc, err := jwt.DecodeAccountClaims(tok)
	if err != nil || cc.Limits.DiskStorage != 40<<30 {
		t.Fatalf("CORE after Refresh: %v %+v", err, cc.Limits.JetStreamLimits)
	}
	if dc, err := jwt.DecodeAccountClaims(read(corePath)); err != nil || dc.Limits.DiskStorage != 40<<30 {
		t.Errorf("resolver's CORE JWT after Refresh: %v", err)
	}
	if changed, err := l.Refresh(); err != nil || changed {
		t.Errorf("second Refresh = %v, %v; want false", changed, err)
	}
	l2, err := Load(dir, subjects.Domain, bigger)
	if err != nil {
		t.Fatal(err)
	}
	if changed, err := l2.Refresh(); err != nil || changed {
		t.Errorf("Refresh after Load of a refreshed dir = %v, %v; want false", changed, err)
	}

	// A FLEET-only change.
	fewer := bigger
	fewer.Connections = 100
	l3, err := Load(dir, subjects.Domain, fewer)
	if err != nil {
		t.Fatal(err)
	}
	coreBefore = read(corePath)
	if changed, err := l3.Refresh(); err != nil || !changed {
		t.Fatalf("Refresh with a new connection limit = %v, %v; want true", changed, err)
	}
	if read(corePath) != coreBefore {
		t.Error("CORE re-signed for a FLEET-only change")
	}
	_, fleet, _ := l3.AccountJWTs()
	fc, _ := jwt.DecodeAccountClaims(fleet)
	if fc.Limits.Conn != 100 || fc.Limits.IsJSEnabled() {
		t.Errorf("FLEET after Refresh: %+v", fc.Limits)
	}
	checkScopes(t, l3, fc)
	if changed, err := l3.Refresh(); err != nil || changed {
		t.Errorf("second Refresh = %v, %v; want false", changed, err)
	}
}

func TestRevokePersists(t *testing.T) {
	dir, a := create(t)
	u1, _ := a.NewUser(subjects.RoleAgent, "d1", 0)
	u2, _ := a.NewUser(subjects.RoleAgent, "d2", 0)
	tok, err := a.MergeRevocations(map[string]int64{u1.PublicKey(): time.Now().Add(time.Second).Unix()})
	if err != nil || tok == "" {
		t.Fatalf("MergeRevocations: %q %v", tok, err)
	}
	ac, err := jwt.DecodeAccountClaims(tok)
	if err != nil {
		t.Fatal(err)
	}
	uc1, _ := u1.Claims()
	uc2, _ := u2.Claims()
	if !ac.IsClaimRevoked(uc1) || ac.IsClaimRevoked(uc2) {
		t.Errorf("revocation list: d1 revoked %v, d2 revoked %v", ac.IsClaimRevoked(uc1), ac.IsClaimRevoked(uc2))
	}
	if !a.IsRevoked(u1.PublicKey()) || a.IsRevoked(u2.PublicKey()) {
		t.Error("IsRevoked wrong")
	}
	// The resolver file holds the new JWT.
	b, err := os.ReadFile(filepath.Join(dir, ResolverDir, a.FleetAccount()+".jwt"))
	if err != nil || strings.TrimSpace(string(b)) != tok {
		t.Errorf("resolver file not updated: %v", err)
	}
	// What the list holds already, and keys that are no user keys,
	// change nothing (the coordinator refuses invalid keys before they
	// reach the bucket; a bad entry there must not stop the merge).
	before := dirstate.Take(t, dir)
	if tok, err := a.MergeRevocations(map[string]int64{u1.PublicKey(): 1, "nope": time.Now().Unix()}); err != nil || tok != "" {
		t.Errorf("merge of nothing new: %q %v", tok, err)
	}
	dirstate.Unchanged(t, before, dirstate.Take(t, dir))
	if a.IsRevoked("nope") || a.IsRevoked(u2.PublicKey()) {
		t.Error("an invalid or unnamed key is revoked")
	}

	// A restart (Load + Refresh, even with new settings) keeps revocations.
	l, err := Load(dir, "otherdomain", Limits{Connections: 10, MaxPayload: 1024, JetStreamDisk: 1 << 30, JetStreamMemory: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if !l.IsRevoked(u1.PublicKey()) || l.IsRevoked(u2.PublicKey()) {
		t.Error("revocation lost across Load")
	}
	changed, err := l.Refresh()
	if err != nil || !changed {
		t.Fatalf("Refresh with a new domain and limits = %v, %v; want true", changed, err)
	}
	_, fleet, _ := l.AccountJWTs()
	fc, _ := jwt.DecodeAccountClaims(fleet)
	if !fc.IsClaimRevoked(uc1) {
		t.Error("Refresh dropped the revocation")
	}
	if fc.Limits.Conn != 10 || fc.Limits.Payload != 1024 || fc.Limits.IsJSEnabled() {
		t.Errorf("Refresh did not apply limits: %+v", fc.Limits)
	}
	checkScopes(t, l, fc)
	coreTok, err := l.CoreJWT()
	if err != nil {
		t.Fatal(err)
	}
	cc, _ := jwt.DecodeAccountClaims(coreTok)
	if cc.Limits.DiskStorage != 1<<30 || cc.Limits.MemoryStorage != 1<<20 || cc.Limits.Payload != 1024 {
		t.Errorf("Refresh did not apply CORE's limits: %+v", cc.Limits)
	}
	if len(cc.Revocations) != 0 {
		t.Errorf("CORE has revocations %v: FLEET's users are revoked in FLEET", cc.Revocations)
	}
	l2, err := Load(dir, "otherdomain", Limits{Connections: 10, MaxPayload: 1024, JetStreamDisk: 1 << 30, JetStreamMemory: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if changed, err := l2.Refresh(); err != nil || changed {
		t.Errorf("second Refresh = %v, %v; want false", changed, err)
	}
	if !l2.IsRevoked(u1.PublicKey()) {
		t.Error("revocation lost after Refresh + Load")
	}
}

func TestCreds(t *testing.T) {
	_, a := create(t)
	c, err := a.NewUser(subjects.RoleViewer, "v", 0)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "sub", "v.creds")
	if err := WriteCreds(p, c); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(p)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("creds mode %v, %v", st.Mode().Perm(), err)
	}
	r, err := ReadCreds(p)
	if err != nil {
		t.Fatal(err)
	}
	if r.JWT != c.JWT || r.PublicKey() != c.PublicKey() {
		t.Error("creds round trip changed them")
	}
	good, _ := os.ReadFile(p)

	other, _ := a.NewUser(subjects.RoleViewer, "w", 0)
	otherBytes, _ := other.Bytes()
	// The JWT of c with the seed of other.
	mixed := bytes.Replace(good, seedOf(t, c), seedOf(t, other), 1)
	accSeed := func() []byte {
		kp, _ := nkeys.CreateAccount()
		s, _ := kp.Seed()
		return bytes.Replace(good, seedOf(t, c), s, 1)
	}()
	_, fleetJWT, _ := a.AccountJWTs()
	accJWT := bytes.Replace(good, []byte(c.JWT), []byte(fleetJWT), 1)
	cases := map[string]struct {
		b    []byte
		want string
	}{
		"empty":           {nil, "no user JWT"},
		"garbage":         {[]byte("hello world\n"), "invalid user JWT"},
		"binary":          {[]byte{0, 1, 2, 0xff, '\n'}, ""},
		"jwt only":        {[]byte(c.JWT), "no user seed"},
		"seed only":       {append(seedOf(t, c), '\n'), ""},
		"mismatched seed": {mixed, "does not belong"},
		"account seed":    {accSeed, "no user seed"},
		"account jwt":     {accJWT, "invalid user JWT"},
		"truncated":       {good[:len(good)/2], ""},
		"jwt tampered":    {bytes.Replace(good, []byte(c.JWT[40:50]), []byte("AAAAAAAAAA"), 1), "invalid user JWT"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(dir, name+".creds")
			if err := os.WriteFile(p, tc.b, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := ReadCreds(p)
			wantErr(t, err, p, tc.want)
		})
	}
	if _, err := ParseCreds(otherBytes, "w"); err != nil {
		t.Errorf("ParseCreds of good bytes: %v", err)
	}
	missing := filepath.Join(dir, "nope.creds")
	_, err = ReadCreds(missing)
	wantErr(t, err, missing)
	if err := os.Chmod(p, 0); err == nil && os.Geteuid() != 0 {
		_, err = ReadCreds(p)
		wantErr(t, err, p)
	}
	// A directory is not a creds file.
	_, err = ReadCreds(dir)
	wantErr(t, err, dir)
}

func seedOf(t *testing.T, c *Creds) []byte {
	t.Helper()
	s, err := c.Key.Seed()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestReadSeed(t *testing.T) {
	dir := t.TempDir()
	kp, _ := nkeys.CreateAccount()
	p := filepath.Join(dir, "a.nk")
	if err := WriteSeed(p, kp); err != nil {
		t.Fatal(err)
	}
	got, err := ReadSeed(p, nkeys.PrefixByteAccount)
	if err != nil {
		t.Fatal(err)
	}
	if a, b := mustPub(got), mustPub(kp); a != b {
		t.Errorf("ReadSeed = %s, want %s", a, b)
	}
	_, err = ReadSeed(p, nkeys.PrefixByteOperator)
	wantErr(t, err, p)
	// Atomic writes leave no temporary files behind.
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("dir holds %d entries, want 1", len(entries))
	}
}

// TestFastKey: the derived-once key signs, verifies and names itself as
// the nkeys key pair it wraps; curve keys are left alone.
func TestFastKey(t *testing.T) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	fk := FastKey(kp)
	if fk == kp {
		t.Fatal("a user key was not wrapped")
	}
	want, _ := kp.PublicKey()
	if got, _ := fk.PublicKey(); got != want {
		t.Fatalf("public key %s, want %s", got, want)
	}
	msg := []byte("fleet")
	sig, err := fk.Sign(msg)
	if err != nil {
		t.Fatal(err)
	}
	ref, _ := kp.Sign(msg)
	if string(sig) != string(ref) { // ed25519 signatures are deterministic
		t.Fatal("signature differs from nkeys'")
	}
	if err := kp.Verify(msg, sig); err != nil {
		t.Fatal(err)
	}
	if err := fk.Verify(msg, sig); err != nil {
		t.Fatal(err)
	}
	if err := fk.Verify([]byte("other"), sig); err == nil {
		t.Fatal("a signature over other bytes verified")
	}
	if FastKey(fk) != fk {
		t.Fatal("wrapped twice")
	}
	// Account and operator keys name themselves with their own prefix.
	for _, create := range []func() (nkeys.KeyPair, error){nkeys.CreateAccount, nkeys.CreateOperator} {
		kp, err := create()
		if err != nil {
			t.Fatal(err)
		}
		want, _ := kp.PublicKey()
		if got, _ := FastKey(kp).PublicKey(); got != want {
			t.Fatalf("public key %s, want %s", got, want)
		}
	}
	ck, _ := nkeys.CreateCurveKeys()
	if FastKey(ck) != ck {
		t.Fatal("a curve key was wrapped")
	}
}

// Sites' link accounts derive from CORE's seed: a copy of the identity
// (another coordinator of the cluster) has the same, and a link issued at
// one coordinator verifies against the account the other signs.
func TestSiteLinkAccountsDerived(t *testing.T) {
	dir, a := create(t)
	other := filepath.Join(t.TempDir(), "b")
	if err := CopyIdentity(dir, other); err != nil {
		t.Fatal(err)
	}
	b, err := Load(other, subjects.Domain, DefaultLimits)
	if err != nil {
		t.Fatal(err)
	}
	pa, _ := a.SiteLinkAccount("berlin")
	pb, _ := b.SiteLinkAccount("berlin")
	if pa == "" || pa != pb {
		t.Fatalf("berlin's link account: %q here, %q at the copy", pa, pb)
	}
	ut, err := a.IssueSiteCacheUser(mustPub(newUserKey(t)), "berlin")
	if err != nil {
		t.Fatal(err)
	}
	uc, _ := jwt.DecodeUserClaims(ut)
	tok, err := b.SiteLinkJWT("berlin", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	lc, err := jwt.DecodeAccountClaims(tok)
	if err != nil || lc.Subject != uc.IssuerAccount || !lc.SigningKeys.Contains(uc.Issuer) {
		t.Errorf("berlin's link, issued at one coordinator, is not the other's account's: %v", err)
	}
	// A link issued again revokes those issued in earlier seconds.
	from := time.Unix(uc.IssuedAt+5, 0)
	tok, err = b.SiteLinkJWT("berlin", from)
	if err != nil {
		t.Fatal(err)
	}
	if lc, err = jwt.DecodeAccountClaims(tok); err != nil || !lc.Revocations.IsRevoked(uc.Subject, time.Unix(uc.IssuedAt, 0)) ||
		lc.Revocations.IsRevoked(mustPub(newUserKey(t)), from) {
		t.Errorf("berlin's links from %v: revocations %v", from, lc.Revocations)
	}
	// Another fleet's CORE gives other accounts.
	_, c := create(t)
	if pc, _ := c.SiteLinkAccount("berlin"); pc == pa {
		t.Error("two fleets derived the same link account")
	}
}

func newUserKey(t *testing.T) nkeys.KeyPair {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	return kp
}
