// Package accounts holds fleet's decentralised NATS identity: the operator,
// the system, CORE and FLEET accounts, one scoped signing key per role, user
// JWTs, .creds files and revocation.
//
// CORE holds the fleet's state (every stream and bucket) and has no users
// but the coordinators' own; FLEET holds every client and has no
// JetStream. The coordinator is the only bridge, so nothing a client sends,
// and no reply subject it picks, reaches the state except through the
// coordinator's validated handlers. The exceptions are read-only direct
// gets of the binary cache that FLEET imports (cacheImports): one only the
// coordinator may send (a checked device read, answered by the server
// straight into the device's inbox), and two on a site's mirrors, which
// exist only in a site's own JetStream domain. A site's cache link binds
// to a link account of that site's own (SITELINK_<site>, keys derived from
// CORE's), which reaches CORE only through service imports of its
// consumers' resets and flow control, whose replies the server makes, and
// a stream import of their deliveries (subjects.SiteLinkImports): a reply
// subject the site names is published in its own account, nowhere else.
//
// The data directory keeps the operator's identity seed in a file of its own
// (operator.nk) so it can be moved offline: the running coordinator signs
// account JWTs with an operator signing key and users with the account's
// scoped role keys, and never needs the operator seed.
package accounts

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"

	"fleet/subjects"
)

// File names inside the data directory.
const (
	OperatorSeedFile = "operator.nk"
	OperatorJWTFile  = "operator.jwt"
	AdminCredsFile   = "admin.creds"
	KeysDir          = "keys"
	ResolverDir      = "jwt"

	operatorSigningFile = "operator-signing.nk"
	systemSeedFile      = "sys.nk"
	fleetSeedFile       = "fleet.nk"
	coreSeedFile        = "core.nk"
	// The operator uses strict signing-key usage, so even the accounts'
	// identity keys sign no users: unscoped signing keys do.
	fleetServiceFile  = "fleet-service.nk"
	systemServiceFile = "sys-service.nk"
	coreServiceFile   = "core-service.nk"
)

// Limits are the accounts' limits, written into their JWTs.
type Limits struct {
	// Connections caps concurrent client connections of FLEET (-1:
	// unlimited).
	Connections int64
	// MaxPayload caps one message (bytes).
	MaxPayload int64
	// JetStreamDisk and JetStreamMemory cap CORE's JetStream storage
	// (bytes, -1: unlimited).
	JetStreamDisk   int64
	JetStreamMemory int64
}

// DefaultLimits suit a fleet of tens of thousands of devices on one host.
var DefaultLimits = Limits{
	Connections:     -1,
	MaxPayload:      1 << 20,
	JetStreamDisk:   20 << 30,
	JetStreamMemory: 512 << 20,
}

// Authority is what the coordinator needs to run the identity side of the
// fleet: the operator JWT, the account keys and the role keys. It is safe for
// concurrent use.
type Authority struct {
	dir    string
	domain string
	limits Limits

	OperatorJWT string
	operatorPub string
	opSigner    nkeys.KeyPair
	system      nkeys.KeyPair
	fleet       nkeys.KeyPair
	fleetSvc    nkeys.KeyPair
	systemSvc   nkeys.KeyPair
	core        nkeys.KeyPair
	coreSvc     nkeys.KeyPair
	roles       map[subjects.Role]nkeys.KeyPair

	mu         sync.Mutex
	fleetClaim *jwt.AccountClaims // current, including revocations
	coreClaim  *jwt.AccountClaims
	systemJWT  string
}

// Initialized reports whether dir holds an initialised fleet.
func Initialized(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, OperatorJWTFile))
	return err == nil
}

// Create initialises dir: operator, accounts, role keys and the first owner's
// creds. It refuses a directory that already holds any of them.
func Create(dir, domain string, limits Limits) (*Authority, error) {
	for _, f := range []string{OperatorJWTFile, OperatorSeedFile, AdminCredsFile, KeysDir, ResolverDir} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			return nil, fmt.Errorf("%s already exists: %s is already initialised (use a new --data-dir, or remove it to start over)", filepath.Join(dir, f), dir)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, KeysDir), 0o700); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(dir, ResolverDir), 0o700); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}

	opKey, err := nkeys.CreateOperator()
	if err != nil {
		return nil, err
	}
	a := &Authority{dir: dir, domain: domain, limits: limits, roles: map[subjects.Role]nkeys.KeyPair{}}
	if a.opSigner, err = nkeys.CreateOperator(); err != nil {
		return nil, err
	}
	if a.system, err = nkeys.CreateAccount(); err != nil {
		return nil, err
	}
	if a.fleet, err = nkeys.CreateAccount(); err != nil {
		return nil, err
	}
	a.fleet = FastKey(a.fleet)
	if a.fleetSvc, err = nkeys.CreateAccount(); err != nil {
		return nil, err
	}
	if a.systemSvc, err = nkeys.CreateAccount(); err != nil {
		return nil, err
	}
	if a.core, err = nkeys.CreateAccount(); err != nil {
		return nil, err
	}
	if a.coreSvc, err = nkeys.CreateAccount(); err != nil {
		return nil, err
	}
	for _, r := range subjects.Roles {
		if a.roles[r], err = nkeys.CreateAccount(); err != nil {
			return nil, err
		}
		a.roles[r] = FastKey(a.roles[r]) // as Load's: they sign every enrolment's JWT
	}

	// Operator JWT, self-signed by the identity key that then leaves the
	// running system's path.
	a.operatorPub, _ = opKey.PublicKey()
	oc := jwt.NewOperatorClaims(a.operatorPub)
	oc.Name = "fleet"
	signerPub, _ := a.opSigner.PublicKey()
	oc.SigningKeys.Add(signerPub)
	oc.SystemAccount = mustPub(a.system)
	oc.StrictSigningKeyUsage = true
	if a.OperatorJWT, err = oc.Encode(opKey); err != nil {
		return nil, fmt.Errorf("sign operator: %w", err)
	}

	sc := jwt.NewAccountClaims(mustPub(a.system))
	sc.Name = subjects.AccountSystem
	sc.SigningKeys.Add(mustPub(a.systemSvc))
	if a.systemJWT, err = sc.Encode(a.opSigner); err != nil {
		return nil, fmt.Errorf("sign system account: %w", err)
	}
	a.fleetClaim = jwt.NewAccountClaims(mustPub(a.fleet))
	a.fleetClaim.Name = subjects.AccountFleet
	a.applyFleetPolicy(a.fleetClaim)
	fleetJWT, err := a.fleetClaim.Encode(a.opSigner)
	if err != nil {
		return nil, fmt.Errorf("sign FLEET account: %w", err)
	}
	a.coreClaim = jwt.NewAccountClaims(mustPub(a.core))
	a.coreClaim.Name = subjects.AccountCore
	a.applyCorePolicy(a.coreClaim)
	coreJWT, err := a.coreClaim.Encode(a.opSigner)
	if err != nil {
		return nil, fmt.Errorf("sign CORE account: %w", err)
	}

	// Write keys first and the operator JWT last: its presence marks the
	// directory as initialised, so a crash midway leaves a dir that init
	// refuses and run reports as partial.
	if err := WriteSeed(filepath.Join(dir, OperatorSeedFile), opKey); err != nil {
		return nil, err
	}
	seeds := map[string]nkeys.KeyPair{
		operatorSigningFile: a.opSigner,
		systemSeedFile:      a.system,
		fleetSeedFile:       a.fleet,
		fleetServiceFile:    a.fleetSvc,
		systemServiceFile:   a.systemSvc,
		coreSeedFile:        a.core,
		coreServiceFile:     a.coreSvc,
	}
	for _, r := range subjects.Roles {
		seeds[roleSeedFile(r)] = a.roles[r]
	}
	for name, kp := range seeds {
		if err := WriteSeed(filepath.Join(dir, KeysDir, name), kp); err != nil {
			return nil, err
		}
	}
	if err := a.storeAccountJWT(mustPub(a.system), a.systemJWT); err != nil {
		return nil, err
	}
	if err := a.storeAccountJWT(mustPub(a.fleet), fleetJWT); err != nil {
		return nil, err
	}
	if err := a.storeAccountJWT(mustPub(a.core), coreJWT); err != nil {
		return nil, err
	}
	owner, err := a.NewUser(subjects.RoleOwner, "owner", 0)
	if err != nil {
		return nil, err
	}
	if err := WriteCreds(filepath.Join(dir, AdminCredsFile), owner); err != nil {
		return nil, err
	}
	if err := WriteSecretFile(filepath.Join(dir, OperatorJWTFile), []byte(a.OperatorJWT+"\n")); err != nil {
		return nil, err
	}
	return a, nil
}

// Load reads an initialised dir. Every missing or damaged file is named in
// the error.
func Load(dir, domain string, limits Limits) (*Authority, error) {
	a := &Authority{dir: dir, domain: domain, limits: limits, roles: map[subjects.Role]nkeys.KeyPair{}}
	opPath := filepath.Join(dir, OperatorJWTFile)
	b, err := os.ReadFile(opPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s is missing: %s is not an initialised fleet data dir (run `fleet-coordinator init --data-dir %s`)", opPath, dir, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", opPath, err)
	}
	oc, err := jwt.DecodeOperatorClaims(string(bytes.TrimSpace(b)))
	if err != nil {
		return nil, fmt.Errorf("%s is damaged: %w", opPath, err)
	}
	a.OperatorJWT = string(bytes.TrimSpace(b))
	a.operatorPub = oc.Subject

	keys := filepath.Join(dir, KeysDir)
	if a.opSigner, err = ReadSeed(filepath.Join(keys, operatorSigningFile), nkeys.PrefixByteOperator); err != nil {
		return nil, err
	}
	if !oc.SigningKeys.Contains(mustPub(a.opSigner)) {
		return nil, fmt.Errorf("%s is not a signing key of the operator in %s: the data dir is mixed up", filepath.Join(keys, operatorSigningFile), opPath)
	}
	if a.system, err = ReadSeed(filepath.Join(keys, systemSeedFile), nkeys.PrefixByteAccount); err != nil {
		return nil, err
	}
	if oc.SystemAccount != mustPub(a.system) {
		return nil, fmt.Errorf("%s is not the operator's system account: the data dir is mixed up", filepath.Join(keys, systemSeedFile))
	}
	if a.fleet, err = ReadSeed(filepath.Join(keys, fleetSeedFile), nkeys.PrefixByteAccount); err != nil {
		return nil, err
	}
	if a.fleetSvc, err = ReadSeed(filepath.Join(keys, fleetServiceFile), nkeys.PrefixByteAccount); err != nil {
		return nil, err
	}
	if a.systemSvc, err = ReadSeed(filepath.Join(keys, systemServiceFile), nkeys.PrefixByteAccount); err != nil {
		return nil, err
	}
	if a.core, err = ReadSeed(filepath.Join(keys, coreSeedFile), nkeys.PrefixByteAccount); err != nil {
		return nil, fmt.Errorf("%w (a data dir made before the CORE account existed cannot be upgraded in place: init a new one)", err)
	}
	if a.coreSvc, err = ReadSeed(filepath.Join(keys, coreServiceFile), nkeys.PrefixByteAccount); err != nil {
		return nil, err
	}
	for _, r := range subjects.Roles {
		if a.roles[r], err = ReadSeed(filepath.Join(keys, roleSeedFile(r)), nkeys.PrefixByteAccount); err != nil {
			return nil, err
		}
	}
	sysClaim, err := a.loadAccount(oc, a.system, a.systemSvc, systemServiceFile)
	if err != nil {
		return nil, err
	}
	if a.systemJWT, err = a.readAccountJWT(sysClaim.Subject); err != nil {
		return nil, err
	}
	if a.fleetClaim, err = a.loadAccount(oc, a.fleet, a.fleetSvc, fleetServiceFile); err != nil {
		return nil, err
	}
	if a.coreClaim, err = a.loadAccount(oc, a.core, a.coreSvc, coreServiceFile); err != nil {
		return nil, err
	}
	for _, r := range subjects.Roles {
		if !a.fleetClaim.SigningKeys.Contains(mustPub(a.roles[r])) {
			return nil, fmt.Errorf("%s is not a signing key of the FLEET account in %s: the data dir is mixed up",
				filepath.Join(keys, roleSeedFile(r)), a.accountJWTPath(a.fleetClaim.Subject))
		}
	}
	return a, nil
}

// loadAccount reads and checks the JWT of account acc: it must be that
// account's, signed by the operator oc, and list signer (the key in
// signerFile) as a signing key.
func (a *Authority) loadAccount(oc *jwt.OperatorClaims, acc, signer nkeys.KeyPair, signerFile string) (*jwt.AccountClaims, error) {
	pub := mustPub(acc)
	p := a.accountJWTPath(pub)
	tok, err := a.readAccountJWT(pub)
	if err != nil {
		return nil, err
	}
	ac, err := jwt.DecodeAccountClaims(tok)
	if err != nil {
		return nil, fmt.Errorf("account JWT %s is damaged: %w", p, err)
	}
	if ac.Subject != pub {
		return nil, fmt.Errorf("account JWT %s is for account %s, not %s: the data dir is mixed up", p, ac.Subject, pub)
	}
	if ac.Issuer != oc.Subject && !oc.SigningKeys.Contains(ac.Issuer) {
		return nil, fmt.Errorf("account JWT %s is not signed by this fleet's operator %s: the data dir is mixed up", p, oc.Subject)
	}
	if !ac.SigningKeys.Contains(mustPub(signer)) {
		return nil, fmt.Errorf("%s is not a signing key of the account in %s: the data dir is mixed up",
			filepath.Join(a.dir, KeysDir, signerFile), p)
	}
	return ac, nil
}

// Refresh re-signs the FLEET and CORE account JWTs with this version's role
// templates and limits, keeping FLEET's revocations, and stores them in the
// resolver directory. It is called before the server starts so upgrades and
// changed settings take effect; it reports whether anything changed. (The
// coordinator pushes sites' link accounts, SiteLinkJWT, while it runs.)
func (a *Authority) Refresh() (bool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	coreChanged, err := a.refreshCore()
	if err != nil {
		return false, err
	}
	next := *a.fleetClaim
	next.SigningKeys = jwt.SigningKeys{}
	next.Revocations = maps.Clone(a.fleetClaim.Revocations)
	a.applyFleetPolicy(&next)
	before, _ := json.Marshal(a.fleetClaim.Account)
	after, _ := json.Marshal(next.Account)
	if string(before) == string(after) {
		return coreChanged, nil
	}
	tok, err := next.Encode(a.opSigner)
	if err != nil {
		return false, fmt.Errorf("sign FLEET account: %w", err)
	}
	if err := a.storeAccountJWT(next.Subject, tok); err != nil {
		return false, err
	}
	a.fleetClaim = &next
	return true, nil
}

// refreshCore re-signs the CORE account JWT when its policy changed. a.mu
// is held.
func (a *Authority) refreshCore() (bool, error) {
	next := *a.coreClaim
	next.SigningKeys = jwt.SigningKeys{}
	a.applyCorePolicy(&next)
	before, _ := json.Marshal(a.coreClaim.Account)
	after, _ := json.Marshal(next.Account)
	if string(before) == string(after) {
		return false, nil
	}
	tok, err := next.Encode(a.opSigner)
	if err != nil {
		return false, fmt.Errorf("sign CORE account: %w", err)
	}
	if err := a.storeAccountJWT(next.Subject, tok); err != nil {
		return false, err
	}
	a.coreClaim = &next
	return true, nil
}

// siteLinkKeys are a site's link account's identity and signing keys.
type siteLinkKeys struct{ acc, signer nkeys.KeyPair }

// siteLink returns site's link account keys, derived from CORE's seed:
// they need no files of their own, so every coordinator of a cluster (and
// a data dir made before sites had them) has the same.
func (a *Authority) siteLink(site string) (siteLinkKeys, error) {
	if !subjects.ValidSite(site) || site == subjects.DefaultSite {
		return siteLinkKeys{}, fmt.Errorf("site %q: use lower-case letters, digits and - (e.g. berlin), not the hub's", site)
	}
	// Derived afresh each time (an HMAC each): a site's link is signed a
	// few times a minute at most.
	acc, err := deriveAccount(a.core, "site link account "+site)
	if err != nil {
		return siteLinkKeys{}, err
	}
	signer, err := deriveAccount(a.core, "site link signing key "+site)
	if err != nil {
		return siteLinkKeys{}, err
	}
	return siteLinkKeys{acc, signer}, nil
}

// deriveAccount derives an account key from parent's seed and label.
func deriveAccount(parent nkeys.KeyPair, label string) (nkeys.KeyPair, error) {
	seed, err := parent.Seed()
	if err != nil {
		return nil, fmt.Errorf("derive %s: %w", label, err)
	}
	_, raw, err := nkeys.DecodeSeed(seed)
	if err != nil {
		return nil, fmt.Errorf("derive %s: %w", label, err)
	}
	m := hmac.New(sha256.New, raw)
	m.Write([]byte("fleet: " + label))
	kp, err := nkeys.FromRawSeed(nkeys.PrefixByteAccount, m.Sum(nil))
	if err != nil {
		return nil, fmt.Errorf("derive %s: %w", label, err)
	}
	return kp, nil
}

// SiteLinkAccount is the public key of site's link account.
func (a *Authority) SiteLinkAccount(site string) (string, error) {
	k, err := a.siteLink(site)
	if err != nil {
		return "", err
	}
	return mustPub(k.acc), nil
}

// SiteLinkJWT signs site's link account: the site's cache link (held to
// subjects.SiteCacheTemplate) and the coordinators' own connections, no
// JetStream, no exports, and of CORE only subjects.SiteLinkImports(site).
// Every user issued before linksFrom (whole seconds; the zero time: none)
// is revoked: a site has one cache link, the last issued. Nothing is
// stored: the coordinator pushes it to the servers.
func (a *Authority) SiteLinkJWT(site string, linksFrom time.Time) (string, error) {
	k, err := a.siteLink(site)
	if err != nil {
		return "", err
	}
	c := jwt.NewAccountClaims(mustPub(k.acc))
	c.Name = subjects.SiteLinkAccountName(site)
	c.Limits.Conn = 64 // the coordinators' own connections
	c.Limits.Payload = a.limits.MaxPayload
	c.Limits.Subs = -1
	c.Limits.Data = -1
	c.Limits.LeafNodeConn = 4 // the site's link, and room to reconnect
	c.Limits.Exports = 0
	c.Limits.WildcardExports = false
	c.Limits.JetStreamLimits = jwt.JetStreamLimits{}
	for _, im := range subjects.SiteLinkImports(site) {
		imp := &jwt.Import{Name: im.Name, Subject: jwt.Subject(im.Subject), Account: mustPub(a.core), Type: jwt.Stream}
		if im.Service {
			imp.Type = jwt.Service
		}
		if im.Local != im.Subject {
			imp.LocalSubject = jwt.RenamingSubject(im.Local)
		}
		c.Imports.Add(imp)
	}
	c.Limits.Imports = int64(len(c.Imports))
	c.SigningKeys.Add(mustPub(k.signer))
	if !linksFrom.IsZero() {
		c.Revocations = jwt.RevocationList{}
		c.Revocations.Revoke(jwt.All, linksFrom.Add(-time.Second))
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	tok, err := c.Encode(a.opSigner)
	if err != nil {
		return "", fmt.Errorf("sign %s account: %w", c.Name, err)
	}
	return tok, nil
}

// applyCorePolicy sets the limits and the one signing key of the CORE
// account claim c: JetStream with bounded storage, no imports, exports only
// of cacheImports and subjects.SiteLinkImports, and users only of the
// coordinator's own.
func (a *Authority) applyCorePolicy(c *jwt.AccountClaims) {
	c.Limits.Conn = 64 // the coordinators' own connections
	c.Limits.Payload = a.limits.MaxPayload
	c.Limits.Subs = -1
	c.Limits.Data = -1
	// At a site, the leaf's own CORE (the mirrors' account, with this
	// JWT) solicits the site's cache link, which counts against this
	// limit there; at the hub CORE has no leaf users to accept.
	c.Limits.LeafNodeConn = -1
	c.Limits.Imports = 0
	c.Limits.WildcardExports = true
	c.Limits.JetStreamLimits = jwt.JetStreamLimits{
		MemoryStorage: a.limits.JetStreamMemory,
		DiskStorage:   a.limits.JetStreamDisk,
		Streams:       -1,
		Consumer:      -1,
	}
	c.Imports = nil
	c.Exports = nil
	for _, im := range cacheImports() {
		c.Exports.Add(&jwt.Export{Name: im.Name, Subject: jwt.Subject(im.Subject), Type: jwt.Service, ResponseType: im.resp})
	}
	for _, im := range subjects.SiteLinkImports("*") {
		ex := &jwt.Export{Name: "sitelink-" + im.Name, Subject: jwt.Subject(im.Subject), Type: jwt.Stream}
		if im.Service {
			ex.Type, ex.ResponseType = jwt.Service, jwt.ResponseTypeSingleton
		}
		c.Exports.Add(ex)
	}
	slices.SortFunc(c.Exports, func(x, y *jwt.Export) int { return strings.Compare(string(x.Subject), string(y.Subject)) })
	c.Limits.Exports = int64(len(c.Exports))
	if c.SigningKeys == nil {
		c.SigningKeys = jwt.SigningKeys{}
	}
	// Scoped: a CORE user is a client or in-process connection of a
	// coordinator, never a leaf link, whatever its own JWT says (sites'
	// cache links were CORE users before they had accounts of their own;
	// such creds are refused now).
	s := jwt.NewUserScope()
	s.Key = mustPub(a.coreSvc)
	s.Role = "coordinator"
	s.Description = "the coordinators' own connections to the fleet's state"
	s.Template.Limits = jwt.Limits{NatsLimits: jwt.NatsLimits{Subs: -1, Data: -1, Payload: -1}}
	s.Template.AllowedConnectionTypes = jwt.StringList{jwt.ConnectionTypeStandard, jwt.ConnectionTypeInProcess}
	c.SigningKeys.AddScopedSigner(s)
}

type cacheImport struct {
	Name, Subject, Local string
	resp                 jwt.ResponseType
}

// cacheImports are CORE's exports to FLEET, and nothing else: direct gets
// on the hub's NAR files (subjects.CacheDirect, which no role's template
// lets a client send) and on a site's mirrors of the cache
// (subjects.StreamSiteCache, StreamSiteNarInfo). A NAR read is a batch,
// several replies to one request; a narinfo one message of one key.
func cacheImports() []cacheImport {
	out := []cacheImport{
		{"cache-nar", "$JS.API.DIRECT.GET." + subjects.ObjectStream(subjects.ObjectCache), subjects.CacheDirect, jwt.ResponseTypeStream},
		{"site-cache-nar", "$JS.API.DIRECT.GET." + subjects.StreamSiteCache, subjects.SiteNar, jwt.ResponseTypeStream},
		{"site-cache-narinfo", "$JS.API.DIRECT.GET." + subjects.StreamSiteNarInfo + ".$KV." + subjects.BucketNarInfo + ".*", subjects.SiteNarInfo + ".*", jwt.ResponseTypeSingleton},
	}
	// In the order the JWT keeps them, so that Refresh sees no change.
	slices.SortFunc(out, func(a, b cacheImport) int { return strings.Compare(a.Subject, b.Subject) })
	return out
}

// applyFleetPolicy sets limits and the scoped signing keys of the FLEET
// account claim c. FLEET has no JetStream: it stores nothing.
func (a *Authority) applyFleetPolicy(c *jwt.AccountClaims) {
	c.Limits.Conn = a.limits.Connections
	c.Limits.Payload = a.limits.MaxPayload
	c.Limits.Subs = -1
	c.Limits.Data = -1
	c.Limits.LeafNodeConn = -1
	c.Limits.Exports = 0
	c.Limits.WildcardExports = false
	c.Limits.JetStreamLimits = jwt.JetStreamLimits{}
	c.Imports = nil
	c.Exports = nil
	for _, im := range cacheImports() {
		c.Imports.Add(&jwt.Import{Name: im.Name, Subject: jwt.Subject(im.Subject), LocalSubject: jwt.RenamingSubject(im.Local), Account: mustPub(a.core), Type: jwt.Service})
	}
	c.Limits.Imports = int64(len(c.Imports))
	if c.SigningKeys == nil {
		c.SigningKeys = jwt.SigningKeys{}
	}
	c.SigningKeys.Add(mustPub(a.fleetSvc))
	for _, r := range subjects.Roles {
		t := subjects.RoleTemplate(r)
		s := jwt.NewUserScope()
		s.Key = mustPub(a.roles[r])
		s.Role = string(r)
		s.Description = "fleet role " + string(r)
		s.Template.Pub.Allow = slices.Clone(t.Pub)
		s.Template.Sub.Allow = slices.Clone(t.Sub)
		s.Template.Limits = jwt.Limits{NatsLimits: jwt.NatsLimits{Subs: -1, Data: -1, Payload: -1}}
		if t.MaxSubs > 0 {
			s.Template.Limits.Subs = t.MaxSubs
		}
		if t.MaxPayload > 0 {
			s.Template.Limits.Payload = t.MaxPayload
		}
		s.Template.BearerToken = t.Bearer
		s.Template.AllowedConnectionTypes = slices.Clone(t.ConnTypes)
		c.SigningKeys.AddScopedSigner(s)
	}
}

// OperatorPublicKey is the operator's public key.
func (a *Authority) OperatorPublicKey() string { return a.operatorPub }

// FleetAccount is the FLEET account's public key.
func (a *Authority) FleetAccount() string { return mustPub(a.fleet) }

// CoreAccount is the CORE account's public key.
func (a *Authority) CoreAccount() string { return mustPub(a.core) }

// SystemAccount is the system account's public key.
func (a *Authority) SystemAccount() string { return mustPub(a.system) }

// Domain is the JetStream domain the templates were written for.
func (a *Authority) Domain() string { return a.domain }

// ResolverPath is the directory of the server's full account resolver.
func (a *Authority) ResolverPath() string { return filepath.Join(a.dir, ResolverDir) }

// CoreJWT returns the current CORE account JWT.
func (a *Authority) CoreJWT() (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.coreClaim.Encode(a.opSigner)
}

// AccountJWTs returns the current system and FLEET account JWTs.
func (a *Authority) AccountJWTs() (system, fleet string, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	fleet, err = a.fleetClaim.Encode(a.opSigner)
	return a.systemJWT, fleet, err
}

// RoleKey returns the public key of role r's scoped signing key.
func (a *Authority) RoleKey(r subjects.Role) string { return mustPub(a.roles[r]) }

// RoleOf returns the role whose scoped key issued the user JWT uc, or false
// when uc was not issued by a role key of the FLEET account.
func (a *Authority) RoleOf(uc *jwt.UserClaims) (subjects.Role, bool) {
	if uc.IssuerAccount != mustPub(a.fleet) {
		return "", false
	}
	for r, kp := range a.roles {
		if mustPub(kp) == uc.Issuer {
			return r, true
		}
	}
	return "", false
}

// IssueUser signs a user JWT for public key pub with role r's scoped key.
// name is shown in server logs and monitoring; ttl 0 means no expiry.
func (a *Authority) IssueUser(r subjects.Role, pub, name string, ttl time.Duration) (string, error) {
	return a.IssueSiteUser(r, pub, name, "", ttl)
}

// CheckSiteUser reports whether a user of role r with key pub at site can
// be issued (IssueSiteUser checks the same), and returns the site its JWT
// would name.
func (a *Authority) CheckSiteUser(r subjects.Role, pub, site string) (string, error) {
	if _, ok := a.roles[r]; !ok {
		return "", fmt.Errorf("unknown role %q", r)
	}
	if !subjects.ValidDeviceID(pub) {
		return "", fmt.Errorf("%q is not a user public key", pub)
	}
	switch r {
	case subjects.RoleAgent, subjects.RolePending, subjects.RoleEnroll:
		if site == "" {
			site = subjects.DefaultSite
		}
	case subjects.RoleLeaf:
		if site == "" || site == subjects.DefaultSite {
			return "", fmt.Errorf("site %q: a leaf link needs its own site (not the hub's)", site)
		}
	default:
		if site != "" {
			return "", fmt.Errorf("role %s has no site", r)
		}
	}
	if site != "" && !subjects.ValidSite(site) {
		return "", fmt.Errorf("site %q: use lower-case letters, digits and - (e.g. berlin)", site)
	}
	return site, nil
}

// IssueSiteUser is IssueUser for a user at a site: devices, enrolling
// bearers and leaf links carry their site as a tag, which their templates
// expand ({{tag(site)}}) into the only inboxes they may receive. site ""
// is the hub (subjects.DefaultSite) for device roles.
func (a *Authority) IssueSiteUser(r subjects.Role, pub, name, site string, ttl time.Duration) (string, error) {
	site, err := a.CheckSiteUser(r, pub, site)
	if err != nil {
		return "", err
	}
	kp := a.roles[r]
	uc := jwt.NewUserClaims(pub)
	uc.Name = name
	uc.IssuerAccount = mustPub(a.fleet)
	// Scoped users must carry no permissions or limits of their own: the
	// template in the account JWT is the whole definition of the role.
	uc.UserPermissionLimits = jwt.UserPermissionLimits{}
	if ttl > 0 {
		uc.Expires = time.Now().Add(ttl).Unix()
	}
	uc.Tags.Add("role:" + string(r))
	if site != "" {
		uc.Tags.Add(subjects.SiteTag(site))
	}
	tok, err := uc.Encode(kp)
	if err != nil {
		return "", fmt.Errorf("sign %s user: %w", r, err)
	}
	return tok, nil
}

// NewUser creates a fresh user key and its JWT for role r.
func (a *Authority) NewUser(r subjects.Role, name string, ttl time.Duration) (*Creds, error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, err
	}
	tok, err := a.IssueUser(r, mustPub(kp), name, ttl)
	if err != nil {
		return nil, err
	}
	return &Creds{JWT: tok, Key: kp}, nil
}

// CoreUser creates a CORE user with every permission, for the
// coordinator's own in-process connection to the fleet's state. It is never
// written to disk. CORE's signing key is scoped (applyCorePolicy): the
// user carries no permissions or limits of its own.
func (a *Authority) CoreUser(name string) (*Creds, error) {
	return a.accountUser(a.coreSvc, a.core, name, true)
}

// SiteLinkUser creates a user of site's link account with every
// permission, for the coordinator's own connection to the site's cache
// link: it sets up the site's mirrors. It is never written to disk.
func (a *Authority) SiteLinkUser(site, name string) (*Creds, error) {
	k, err := a.siteLink(site)
	if err != nil {
		return nil, err
	}
	return a.accountUser(k.signer, k.acc, name, false)
}

// ServiceUser creates an unscoped FLEET user with every permission, for the
// coordinator's own in-process connection to the clients: it answers their
// requests and sends devices their triggers. It is never written to disk.
func (a *Authority) ServiceUser(name string) (*Creds, error) {
	return a.accountUser(a.fleetSvc, a.fleet, name, false)
}

// SystemUser creates a system-account user for the coordinator: it listens
// to connect/disconnect events and pushes account JWT updates.
func (a *Authority) SystemUser(name string) (*Creds, error) {
	return a.accountUser(a.systemSvc, a.system, name, false)
}

// IssueSiteSystemUser signs a system-account user JWT for a site's leaf
// node (public key pub), limited to subjects.SiteSystemTemplate: enough for
// the leaf to learn account updates and report presence, nothing more.
func (a *Authority) IssueSiteSystemUser(pub, name string) (string, error) {
	if !subjects.ValidDeviceID(pub) {
		return "", fmt.Errorf("%q is not a user public key", pub)
	}
	t := subjects.SiteSystemTemplate()
	uc := jwt.NewUserClaims(pub)
	uc.Name = name
	uc.IssuerAccount = mustPub(a.system)
	uc.Pub.Allow = t.Pub
	uc.Sub.Allow = t.Sub
	uc.AllowedConnectionTypes = t.ConnTypes
	tok, err := uc.Encode(a.systemSvc)
	if err != nil {
		return "", fmt.Errorf("sign %s: %w", name, err)
	}
	return tok, nil
}

// IssueSiteCacheUser signs a user JWT of site's link account for the
// site's leaf link that feeds its mirrors of the cache (public key pub),
// held to subjects.SiteCacheTemplate.
func (a *Authority) IssueSiteCacheUser(pub, site string) (string, error) {
	if !subjects.ValidDeviceID(pub) {
		return "", fmt.Errorf("%q is not a user public key", pub)
	}
	k, err := a.siteLink(site)
	if err != nil {
		return "", err
	}
	t := subjects.SiteCacheTemplate(site)
	uc := jwt.NewUserClaims(pub)
	uc.Name = "leaf-" + site + "-cache"
	uc.IssuerAccount = mustPub(k.acc)
	uc.Pub.Allow = t.Pub
	uc.Sub.Allow = t.Sub
	uc.AllowedConnectionTypes = t.ConnTypes
	uc.Tags.Add(subjects.SiteTag(site))
	tok, err := uc.Encode(k.signer)
	if err != nil {
		return "", fmt.Errorf("sign %s: %w", uc.Name, err)
	}
	return tok, nil
}

// accountUser creates a user of acc signed by signer; with scoped, the
// signer is a scoped signing key, whose users may carry no permissions or
// limits of their own.
func (a *Authority) accountUser(signer, acc nkeys.KeyPair, name string, scoped bool) (*Creds, error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, err
	}
	uc := jwt.NewUserClaims(mustPub(kp))
	uc.Name = name
	uc.IssuerAccount = mustPub(acc)
	if scoped {
		uc.UserPermissionLimits = jwt.UserPermissionLimits{}
	}
	tok, err := uc.Encode(signer)
	if err != nil {
		return nil, fmt.Errorf("sign %s user: %w", name, err)
	}
	return &Creds{JWT: tok, Key: kp}, nil
}

// MergeRevocations adds revocations (user key → unix time) to the FLEET
// account's list, never removing one, and returns the re-signed account
// JWT (also stored in the resolver directory) when anything was added, or
// "" when the list already held them all.
func (a *Authority) MergeRevocations(revs map[string]int64) (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var next jwt.RevocationList
	for k, at := range revs {
		if !subjects.ValidDeviceID(k) {
			continue
		}
		if cur, ok := a.fleetClaim.Revocations[k]; ok && cur >= at {
			continue
		}
		if next == nil {
			next = maps.Clone(a.fleetClaim.Revocations)
			if next == nil {
				next = jwt.RevocationList{}
			}
		}
		next[k] = at
	}
	if next == nil {
		return "", nil
	}
	claim := *a.fleetClaim
	claim.Revocations = next
	tok, err := claim.Encode(a.opSigner)
	if err != nil {
		return "", fmt.Errorf("sign FLEET account: %w", err)
	}
	if err := a.storeAccountJWT(claim.Subject, tok); err != nil {
		return "", err
	}
	a.fleetClaim = &claim
	return tok, nil
}

// Revocations returns a copy of the FLEET account's revocation list.
func (a *Authority) Revocations() map[string]int64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return maps.Clone(a.fleetClaim.Revocations)
}

// RevokedAt is when user key pub's revocation takes effect (unix seconds),
// and whether it is on the revocation list.
func (a *Authority) RevokedAt(pub string) (int64, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	at, ok := a.fleetClaim.Revocations[pub]
	return at, ok
}

// IsRevoked reports whether user key pub is on the revocation list.
func (a *Authority) IsRevoked(pub string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.fleetClaim.Revocations[pub]
	return ok
}

func (a *Authority) accountJWTPath(pub string) string {
	return filepath.Join(a.dir, ResolverDir, pub+".jwt")
}

// storeAccountJWT writes an account JWT where the server's directory
// resolver looks for it.
func (a *Authority) storeAccountJWT(pub, tok string) error {
	return WriteSecretFile(a.accountJWTPath(pub), []byte(tok))
}

func (a *Authority) readAccountJWT(pub string) (string, error) {
	p := a.accountJWTPath(pub)
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("account JWT %s is missing: the data dir is partial (restore it from a backup)", p)
	}
	if err != nil {
		return "", fmt.Errorf("read account JWT %s: %w", p, err)
	}
	return string(bytes.TrimSpace(b)), nil
}

func roleSeedFile(r subjects.Role) string { return "role-" + string(r) + ".nk" }

func mustPub(kp nkeys.KeyPair) string {
	pub, err := kp.PublicKey()
	if err != nil {
		// Only a wiped key pair fails here; keys are never wiped while held.
		return ""
	}
	return pub
}

// IdentityFiles are the files and directories of a data dir that every
// coordinator of a cluster shares: the operator JWT, the account and role
// keys, the account JWTs and the first owner's creds. The operator's
// identity seed stays behind (no coordinator needs it), and so does the
// JetStream data, which each server keeps for itself.
var IdentityFiles = []string{OperatorJWTFile, KeysDir, ResolverDir, AdminCredsFile}

// CopyIdentity copies the identity files of the initialised data dir from
// into the data dir to, for another coordinator of the same cluster. It
// refuses a target that already holds any of them, or JetStream data.
func CopyIdentity(from, to string) error {
	if !Initialized(from) {
		return fmt.Errorf("%s is not an initialised fleet data dir (its %s is missing)", from, OperatorJWTFile)
	}
	if _, err := Load(from, subjects.Domain, DefaultLimits); err != nil {
		return err
	}
	for _, f := range append(slices.Clone(IdentityFiles), "jetstream", OperatorSeedFile) {
		if _, err := os.Lstat(filepath.Join(to, f)); err == nil {
			return fmt.Errorf("%s already exists: %s is already initialised; nothing was copied", filepath.Join(to, f), to)
		}
	}
	if err := os.MkdirAll(to, 0o700); err != nil {
		return fmt.Errorf("create data dir %s: %w", to, err)
	}
	for _, f := range IdentityFiles {
		src := filepath.Join(from, f)
		if _, err := os.Stat(src); errors.Is(err, fs.ErrNotExist) && f == AdminCredsFile {
			continue // moved away already: admins come from fleet_admins
		}
		if err := copyTree(src, filepath.Join(to, f)); err != nil {
			return err
		}
	}
	return nil
}

// copyTree copies a file or a directory of files, private to the owner.
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		out := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(out, 0o700)
		}
		if !d.Type().IsRegular() {
			return fmt.Errorf("%s is not a regular file", p)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if err := os.WriteFile(out, b, 0o600); err != nil {
			return fmt.Errorf("copy %s: %w", p, err)
		}
		return nil
	})
}
