package admin

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"

	"fleet/accounts"
	"fleet/model"
	"fleet/subjects"
)

// LeafCmd is `fleet-admin leaf`.
type LeafCmd struct {
	Config LeafConfigCmd `cmd:"" help:"Write the config and credentials of a site's leaf node (a standard nats-server)."`
	Revoke LeafRevokeCmd `cmd:"" help:"Cut a site's leaf links off: its cache link (every one issued) and the leaf links named by --key."`
}

// LeafRevokeCmd is `fleet-admin leaf revoke`.
type LeafRevokeCmd struct {
	Site string   `help:"Site name, e.g. berlin." required:""`
	Key  []string `help:"Public key of a leaf link (leaf.creds) to revoke, as leaf config printed it (\"leaf key U...\"); repeat or comma-separate." placeholder:"UKEY" sep:","`
}

// Run revokes the site's links, once confirmed.
func (cmd *LeafRevokeCmd) Run(g *Globals) error {
	what := "every cache link of site " + cmd.Site
	if len(cmd.Key) > 0 {
		what += fmt.Sprintf(" and its leaf link(s) %s", strings.Join(cmd.Key, ", "))
	}
	if err := g.confirm("revoke " + what + "? They are cut off at once; `leaf config` issues new ones"); err != nil {
		return err
	}
	var out model.LeafRevoked
	if err := g.call(subjects.VerbLeafRevoke, true, model.LeafRevoke{Site: cmd.Site, Keys: cmd.Key}, &out); err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(out)
	}
	if out.CacheLinks {
		fmt.Fprintf(g.stdout, "revoked every cache link of %s: its copy of the cache is no longer fed (run leaf config --cache for a new link)\n", out.Site)
	}
	for _, k := range out.Keys {
		fmt.Fprintf(g.stdout, "revoked leaf link %s of %s\n", k, out.Site)
	}
	return nil
}

// LeafConfigCmd is `fleet-admin leaf config`.
type LeafConfigCmd struct {
	Site   string `help:"Site name, e.g. berlin." required:""`
	Out    string `help:"Directory to write leaf.conf, leaf.creds, leaf-system.creds, operator.jwt and jwt/ into (created; must not hold a leaf.conf)." required:"" type:"path"`
	Hub    string `help:"Leaf node URL of the coordinator as the site reaches it, e.g. nats-leaf://fleet.example.org:7422 (default: what the coordinator reports)." placeholder:"URL"`
	Listen string `help:"Where the leaf node listens for the site's agents." default:"0.0.0.0:4222"`
	// leaf.conf names its files by absolute path (nats-server resolves
	// relative ones against its working directory, not the config file).
	InstallDir string `help:"Where the files will live at the site, for the paths in leaf.conf (default: --out)." placeholder:"DIR"`
	// A copy of the binary cache at the site.
	Cache         bool          `help:"Keep a copy of the fleet's binary cache at the site: the leaf runs JetStream in its own domain (the site's name) with mirrors of the hub's cache, fed once across the WAN; the site's agents read there first."`
	CacheMaxBytes string        `help:"Bound of the site's copy; the oldest files go first (e.g. 50GiB)." default:"20GiB"`
	CacheMaxAge   time.Duration `help:"How long the site's copy keeps a file." default:"720h"`
}

// Run writes the leaf node's files. The leaf's key is made here and its
// seed never leaves this machine and the site.
func (cmd *LeafConfigCmd) Run(g *Globals) error {
	if _, _, err := net.SplitHostPort(cmd.Listen); err != nil {
		return fmt.Errorf("--listen %q: want host:port", cmd.Listen)
	}
	conf := filepath.Join(cmd.Out, "leaf.conf")
	if _, err := os.Stat(conf); err == nil {
		return fmt.Errorf("%s exists already: choose another --out (nothing was changed)", conf)
	}
	kp, err := nkeys.CreateUser()
	if err != nil {
		return err
	}
	pub, _ := kp.PublicKey()
	sysKP, err := nkeys.CreateUser()
	if err != nil {
		return err
	}
	sysPub, _ := sysKP.PublicKey()
	req := model.LeafConfigRequest{Site: cmd.Site, Key: pub, SystemKey: sysPub}
	var cacheKP nkeys.KeyPair
	var cacheBytes int64
	if cmd.Cache {
		if cacheBytes, err = ParseSize(cmd.CacheMaxBytes); err != nil {
			return fmt.Errorf("--cache-max-bytes: %w", err)
		}
		if cacheKP, err = nkeys.CreateUser(); err != nil {
			return err
		}
		cachePub, _ := cacheKP.PublicKey()
		req.Cache = &model.SiteCache{Key: cachePub, MaxBytes: cacheBytes, MaxAge: model.Duration(cmd.CacheMaxAge)}
	}
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	var lc model.LeafConfig
	if err := c.Call(g.ctx, subjects.VerbLeafConfig, true, req, &lc); err != nil {
		return err
	}
	hub := cmd.Hub
	if hub == "" {
		hub = lc.HubURL
	}
	if hub == "" {
		return errors.New("the coordinator does not listen for leaf nodes: run it with --leafnode-listen, then pass --hub with the address sites reach it on")
	}
	out, err := filepath.Abs(cmd.Out)
	if err != nil {
		return err
	}
	install := out
	if cmd.InstallDir != "" {
		if !filepath.IsAbs(cmd.InstallDir) {
			return fmt.Errorf("--install-dir %q must be an absolute path", cmd.InstallDir)
		}
		install = cmd.InstallDir
	}
	if err := os.MkdirAll(filepath.Join(out, "jwt"), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", out, err)
	}
	if err := accounts.WriteCreds(filepath.Join(out, "leaf.creds"), &accounts.Creds{JWT: lc.JWT, Key: kp}); err != nil {
		return err
	}
	if err := accounts.WriteCreds(filepath.Join(out, "leaf-system.creds"), &accounts.Creds{JWT: lc.SystemUserJWT, Key: sysKP}); err != nil {
		return err
	}
	files := map[string]string{
		"operator.jwt": lc.OperatorJWT,
		filepath.Join("jwt", lc.SystemAccount+".jwt"): lc.SystemJWT,
		filepath.Join("jwt", lc.FleetAccount+".jwt"):  lc.FleetJWT,
		"leaf.conf": LeafServerConfig(&lc, install, hub, cmd.Listen, cacheBytes),
	}
	if cmd.Cache {
		if lc.CacheUserJWT == "" {
			return errors.New("the coordinator did not set up the site's cache (an older coordinator?): nothing written")
		}
		if err := accounts.WriteCreds(filepath.Join(out, "leaf-cache.creds"), &accounts.Creds{JWT: lc.CacheUserJWT, Key: cacheKP}); err != nil {
			return err
		}
	}
	if lc.CoreJWT != "" {
		files[filepath.Join("jwt", lc.CoreAccount+".jwt")] = lc.CoreJWT
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(out, name), []byte(body), 0o600); err != nil {
			return fmt.Errorf("write %s: %w", name, err)
		}
	}
	if g.JSON {
		res := map[string]string{"site": cmd.Site, "config": conf, "leaf_key": pub, "hub": hub,
			"fleet_account": lc.FleetAccount, "system_account": lc.SystemAccount, "install_dir": install}
		if cmd.Cache {
			res["core_account"] = lc.CoreAccount
		}
		return g.printJSON(res)
	}
	_, err = fmt.Fprintf(g.stdout, "wrote leaf.conf, leaf.creds, leaf-system.creds, operator.jwt and jwt/ to %s (leaf key %s, FLEET account %s)\n"+
		"at the site, with the files in %s: nats-server -c %s\nagents at the site: fleet-agent run --server nats://<this-leaf>:%s ...\n",
		out, pub, lc.FleetAccount, install, filepath.Join(install, "leaf.conf"), portOf(cmd.Listen))
	return err
}

// ParseSize reads a size in bytes with an optional binary unit: 512MiB,
// 20GiB, 1TiB (K, M, G, T and KB, MB, GB, TB mean the same).
func ParseSize(s string) (int64, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "I")
	unit := int64(1)
	if t != "" {
		if i := strings.IndexByte("KMGT", t[len(t)-1]); i >= 0 {
			unit = 1 << (10 * (i + 1))
			t = strings.TrimSpace(t[:len(t)-1])
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/unit {
		return 0, fmt.Errorf("%q: want a size such as 20GiB", s)
	}
	return n * unit, nil
}

func portOf(hp string) string {
	_, p, _ := net.SplitHostPort(hp)
	return p
}

// LeafServerConfig renders a nats-server config for a site's leaf node:
// operator mode with this fleet's operator, a cache resolver seeded with the
// account JWTs, and two remotes to the hub: one bound to the FLEET account
// for the site's devices, one to the system account, over which the leaf
// hears account updates at once (a revoked device at the site is cut off
// like one at the hub) and reports its clients' presence. dir holds the
// files it names. With a copy of the cache (lc.CacheUserJWT, cacheBytes
// its bound), the leaf also runs JetStream in the site's own domain, knows
// the CORE account the mirrors live in, and links its CORE to the hub's
// SITELINK account with leaf-cache.creds, which may only feed the mirrors.
func LeafServerConfig(lc *model.LeafConfig, dir, hub, listen string, cacheBytes int64) string {
	q := strconv.Quote
	var b strings.Builder
	fmt.Fprintf(&b, "# Leaf node of site %s, written by fleet-admin leaf config.\n", lc.Site)
	fmt.Fprintf(&b, "server_name: %s\n", q("leaf-"+lc.Site))
	fmt.Fprintf(&b, "listen: %s\n", q(listen))
	fmt.Fprintf(&b, "operator: %s\n", q(filepath.Join(dir, "operator.jwt")))
	fmt.Fprintf(&b, "system_account: %s\n", q(lc.SystemAccount))
	fmt.Fprintf(&b, "resolver: { type: cache, dir: %s, ttl: \"1h\", limit: 1000 }\n", q(filepath.Join(dir, "jwt")))
	b.WriteString("resolver_preload: {\n")
	fmt.Fprintf(&b, "  %s: %s\n", lc.SystemAccount, q(lc.SystemJWT))
	fmt.Fprintf(&b, "  %s: %s\n", lc.FleetAccount, q(lc.FleetJWT))
	if lc.CoreJWT != "" {
		// FLEET's imports name CORE.
		fmt.Fprintf(&b, "  %s: %s\n", lc.CoreAccount, q(lc.CoreJWT))
	}
	b.WriteString("}\n")
	if lc.CacheUserJWT != "" {
		// The server must hold what the CORE account's JWT reserves (the
		// hub's limits, or JetStream refuses the account); the mirrors'
		// own bounds keep the disk they use to the cache's.
		disk, mem := cacheBytes+cacheBytes/8+(256<<20), int64(64<<20)
		if ac, err := jwt.DecodeAccountClaims(lc.CoreJWT); err == nil {
			disk = max(disk, ac.Limits.JetStreamLimits.DiskStorage)
			mem = max(mem, ac.Limits.JetStreamLimits.MemoryStorage)
		}
		fmt.Fprintf(&b, "jetstream {\n  domain: %s\n  store_dir: %s\n  max_file_store: %d\n  max_memory_store: %d\n}\n",
			q(lc.Site), q(filepath.Join(dir, "jetstream")), disk, mem)
	}
	b.WriteString("leafnodes {\n  remotes: [\n")
	fmt.Fprintf(&b, "    { urls: [%s], credentials: %s, account: %s }\n", q(hub), q(filepath.Join(dir, "leaf.creds")), q(lc.FleetAccount))
	if lc.SystemUserJWT != "" {
		fmt.Fprintf(&b, "    { urls: [%s], credentials: %s, account: %s }\n", q(hub), q(filepath.Join(dir, "leaf-system.creds")), q(lc.SystemAccount))
	}
	if lc.CacheUserJWT != "" {
		fmt.Fprintf(&b, "    { urls: [%s], credentials: %s, account: %s }\n", q(hub), q(filepath.Join(dir, "leaf-cache.creds")), q(lc.CoreAccount))
	}
	b.WriteString("  ]\n}\n")
	return b.String()
}
