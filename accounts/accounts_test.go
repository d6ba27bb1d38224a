package accounts

import (
	"bytes"
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
	dir := t.TempDir()
	a, err := Create(dir, subjects.Domain, DefaultLimits)
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
	if fc.Limits.JetStreamLimits.DiskStorage != DefaultLimits.JetStreamDisk || fc.Limits.Payload != DefaultLimits.MaxPayload {
		t.Errorf("FLEET limits not applied: %+v", fc.Limits)
	}
	for _, r := range subjects.Roles {
		sk, ok := fc.SigningKeys.GetScope(a.RoleKey(r))
		if !ok || sk == nil {
			t.Fatalf("role %s has no scoped signing key in the account", r)
		}
		us := sk.(*jwt.UserScope)
		want := subjects.RoleTemplate(r, subjects.Domain)
		if us.Role != string(r) || !slices.Equal(us.Template.Pub.Allow, want.Pub) || !slices.Equal(us.Template.Sub.Allow, want.Sub) ||
			us.Template.BearerToken != want.Bearer {
			t.Errorf("role %s scope %+v does not match its template %+v", r, us.Template, want)
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
	if b.OperatorPublicKey() != a.OperatorPublicKey() || b.FleetAccount() != a.FleetAccount() ||
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
	if changed, err := b.Refresh(); err != nil || changed {
		t.Errorf("Refresh of an unchanged dir = %v, %v; want false, nil", changed, err)
	}
	if b.ResolverPath() != filepath.Join(dir, ResolverDir) || b.Domain() != subjects.Domain {
		t.Errorf("ResolverPath %s Domain %s", b.ResolverPath(), b.Domain())
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
	}
	for _, f := range []string{fleetServiceFile, roleSeedFile(subjects.RoleAgent), roleSeedFile(subjects.RoleEnroll)} {
		p := filepath.Join(KeysDir, f)
		cases = append(cases, damage{"key of another fleet " + f, p, copyFrom(filepath.Join(otherDir, p)), []string{"mixed up"}})
	}
	for _, f := range []string{operatorSigningFile, systemSeedFile, fleetSeedFile, fleetServiceFile, systemServiceFile, roleSeedFile(subjects.RoleAgent), roleSeedFile(subjects.RoleOwner)} {
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
		if !uc.Tags.Contains("role:" + string(r)) {
			t.Errorf("role %s: tags %v", r, uc.Tags)
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

func TestRevokePersists(t *testing.T) {
	dir, a := create(t)
	u1, _ := a.NewUser(subjects.RoleAgent, "d1", 0)
	u2, _ := a.NewUser(subjects.RoleAgent, "d2", 0)
	tok, err := a.Revoke(u1.PublicKey())
	if err != nil {
		t.Fatal(err)
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
	// Invalid keys are refused and nothing changes.
	before := dirstate.Take(t, dir)
	if _, err := a.Revoke(u2.PublicKey(), "nope"); err == nil {
		t.Error("Revoke of an invalid key succeeded")
	}
	dirstate.Unchanged(t, before, dirstate.Take(t, dir))
	if a.IsRevoked(u2.PublicKey()) {
		t.Error("failed Revoke still revoked the valid key")
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
	if fc.Limits.Conn != 10 || fc.Limits.Payload != 1024 {
		t.Errorf("Refresh did not apply limits: %+v", fc.Limits)
	}
	sk, _ := fc.SigningKeys.GetScope(l.RoleKey(subjects.RoleAgent))
	if us := sk.(*jwt.UserScope); !slices.Equal(us.Template.Pub.Allow, subjects.RoleTemplate(subjects.RoleAgent, "otherdomain").Pub) {
		t.Errorf("Refresh did not apply the new domain: %v", us.Template.Pub.Allow)
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
