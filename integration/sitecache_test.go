package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/agent"
	"fleet/broker"
	"fleet/internal/poll"
	"fleet/internal/promvalue"
	"fleet/model"
	"fleet/nixtest"
	"fleet/subjects"
)

// A site with a copy of the cache, as fleet-admin leaf config --cache
// writes it, run by the real nats-server: a closure pushed to the hub
// crosses the leaf links once (into the site's mirrors); two devices at
// the site fetch it with nix copy --from their loopback substituters and
// it does not cross again. A cold copy falls back to the hub's cache.
func TestSiteCacheLeaf(t *testing.T) {
	nixtest.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	env, err := nixtest.New(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	_ = env.Close()
	const mb = 4
	expr := fmt.Sprintf(`derivation { name = "site-closure"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "/bin/dd if=/dev/urandom of=$out bs=1048576 count=%d" ]; nonce = "%d"; }`, mb, time.Now().UnixNano())
	file := filepath.Join(env.Dir, "site.nix")
	if err := os.WriteFile(file, []byte(expr), 0o644); err != nil {
		t.Fatal(err)
	}
	path := strings.TrimSpace(runEnv(t, env, "nix-build", "--no-out-link", file))
	runEnv(t, env, "nix", "store", "sign", "--key-file", env.TrustedKey.SecretFile, path)

	cfg := broker.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Listen = "127.0.0.1:0"
	cfg.HTTP = ""
	cfg.LeafnodeListen = freeAddr(t)
	coord, err := broker.Start(ctx, cfg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer coord.Close()
	creds := filepath.Join(cfg.DataDir, accounts.AdminCredsFile)
	fleetAdmin := func(args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, adminBin, append([]string{"--server", "nats://" + coord.ClientAddr(), "--creds", creds}, args...)...)
		cmd.Env = env.Environ()
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			t.Fatalf("fleet-admin %s: %v\n%s", strings.Join(args, " "), err, errb.String())
		}
		return out.String()
	}
	fleetAdmin("cache", "push", path)

	leafURL := startSiteLeaf(t, coord, fleetAdmin)

	// The mirrors fill: the one crossing of the file.
	narBytes := cacheFileBytes(t, coord, path)
	siteAdmin, err := coord.Authority().CoreUser("test-site-admin")
	if err != nil {
		t.Fatal(err)
	}
	sc := connectCreds(t, leafURL, siteAdmin, "")
	sjs, err := jetstream.New(sc)
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 30*time.Second, "the site's mirrors filled", func() bool {
		ni, err1 := sjs.Stream(ctx, subjects.StreamSiteNarInfo)
		obj, err2 := sjs.Stream(ctx, subjects.StreamSiteCache)
		return err1 == nil && err2 == nil && ni.CachedInfo().State.Msgs >= 1 && obj.CachedInfo().State.Bytes >= uint64(narBytes)
	})
	out0 := leafOut(t, coord)
	if out0 < narBytes || out0 > narBytes*3/2 {
		t.Fatalf("%d bytes crossed the leaf links for a %d-byte file", out0, narBytes)
	}

	// Two devices at the site fetch it.
	fetch := func(name string) (site, hub int) {
		t.Helper()
		dev, err := coord.Authority().NewUser(subjects.RoleAgent, name, 0)
		if err != nil {
			t.Fatal(err)
		}
		if dev.JWT, err = coord.Authority().IssueSiteUser(subjects.RoleAgent, dev.PublicKey(), name, "berlin", 0); err != nil {
			t.Fatal(err)
		}
		recordSiteDevice(t, coord, dev, "berlin")
		nc := connectCreds(t, leafURL, dev, dev.InboxPrefix())
		srv, err := agent.ServeFleetCache(nc, dev.PublicKey(), zerolog.Nop())
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		if err := env.Delete(ctx, path); err != nil {
			t.Fatal(err)
		}
		runEnv(t, env, "nix", "copy", "--from", srv.URL(), path)
		if !env.Valid(ctx, path) {
			t.Fatalf("%s: %s not in the store after nix copy", name, path)
		}
		return srv.NarInfos()
	}
	for _, name := range []string{"berlin-1", "berlin-2"} {
		if s, h := fetch(name); s == 0 || h != 0 {
			t.Fatalf("%s: narinfos from the site %d, from the hub %d", name, s, h)
		}
	}
	if d := leafOut(t, coord) - out0; d > narBytes/4 {
		t.Fatalf("two fetches at the site took %d more bytes across the leaf links (file: %d)", d, narBytes)
	}
	if v := sentTo(t, coord, "berlin"); v != 0 {
		t.Fatalf("the coordinator sent berlin %v bytes", v)
	}

	// Cold: the copy lost what it held; the hub's cache serves.
	for _, name := range []string{subjects.StreamSiteCache, subjects.StreamSiteNarInfo} {
		st, err := sjs.Stream(ctx, name)
		if err == nil {
			err = st.Purge(ctx)
		}
		if err != nil {
			t.Fatalf("purge %s at the site: %v", name, err)
		}
	}
	if s, h := fetch("berlin-3"); s != 0 || h == 0 {
		t.Fatalf("cold copy: narinfos from the site %d, from the hub %d", s, h)
	}
	if v := sentTo(t, coord, "berlin"); v != float64(narBytes) {
		t.Fatalf("the coordinator sent berlin %v bytes, want %d", v, narBytes)
	}
}

// cacheFileBytes is the size of path's NAR file in the hub's cache.
func cacheFileBytes(t *testing.T, c *broker.Coordinator, path string) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	obs, err := c.JetStream().ObjectStore(ctx, subjects.ObjectCache)
	if err != nil {
		t.Fatal(err)
	}
	lister, err := obs.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(lister) != 1 {
		t.Fatalf("%d files in the cache for %s", len(lister), path)
	}
	return int64(lister[0].Size)
}

// leafOut is what the hub sent over all its leaf links.
func leafOut(t *testing.T, c *broker.Coordinator) int64 {
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

func sentTo(t *testing.T, c *broker.Coordinator, site string) float64 {
	t.Helper()
	v, _, err := promvalue.Get(c.Metrics(), "fleet_cache_sent_bytes_total", map[string]string{"site": site})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// connectCreds connects to url as cr, with inbox prefix inbox ("" for
// the default).
func connectCreds(t *testing.T, url string, cr *accounts.Creds, inbox string) *nats.Conn {
	t.Helper()
	seed, _ := cr.Key.Seed()
	opts := []nats.Option{nats.UserJWTAndSeed(cr.JWT, string(seed))}
	if inbox != "" {
		opts = append(opts, nats.CustomInboxPrefix(inbox))
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// recordSiteDevice records dev as an active device at site, as enrolment
// would.
func recordSiteDevice(t *testing.T, c *broker.Coordinator, dev *accounts.Creds, site string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv, err := c.JetStream().KeyValue(ctx, subjects.BucketDevices)
	if err != nil {
		t.Fatal(err)
	}
	rec, _ := json.Marshal(model.Device{ID: dev.PublicKey(), Name: dev.PublicKey()[:8], Site: site, Status: model.DeviceActive, EnrolledAt: time.Now().UTC()})
	if _, err := kv.Put(ctx, dev.PublicKey(), rec); err != nil {
		t.Fatal(err)
	}
}

// startSiteLeaf writes site berlin's leaf config with a copy of the cache
// (fleetAdmin runs fleet-admin against coord), runs the real nats-server
// on it, waits for its three links at the hub and returns its URL.
func startSiteLeaf(t *testing.T, coord *broker.Coordinator, fleetAdmin func(args ...string) string) string {
	t.Helper()
	site := filepath.Join(t.TempDir(), "berlin")
	leafListen := freeAddr(t)
	fleetAdmin("leaf", "config", "--site", "berlin", "--out", site, "--listen", leafListen, "--cache", "--cache-max-bytes", "256MiB", "--cache-max-age", "24h")
	conf, err := os.ReadFile(filepath.Join(site, "leaf.conf"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(conf), `domain: "berlin"`) || !strings.Contains(string(conf), "leaf-cache.creds") {
		t.Fatalf("leaf.conf has no cache:\n%s", conf)
	}
	if fi, err := os.Stat(filepath.Join(site, "leaf-cache.creds")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("leaf-cache.creds: %v %v", err, fi)
	}
	runLeafServer(t, filepath.Join(site, "leaf.conf"))
	poll.Until(t, 20*time.Second, "leaf node up, its three links at the hub", func() bool {
		c, err := net.Dial("tcp", leafListen)
		if err == nil {
			c.Close()
		}
		return err == nil && coord.Server().NumLeafNodes() == 3
	})
	return "nats://" + leafListen
}

// The real agents at a site with a copy of the cache: a release pushed
// with --push is deployed to two devices connected to the site's leaf;
// each closure crosses the leaf links once (into the copy), the agents
// fetch from the copy (the coordinator sends the site no NAR bytes) and
// switch.
func TestSiteCacheAgents(t *testing.T) {
	w := newCacheCoordinator(t, func(cfg *broker.Config) { cfg.LeafnodeListen = freeAddr(t) })
	leafURL := startSiteLeaf(t, w.coord, func(args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(w.ctx, adminBin, append([]string{"--server", "nats://" + w.coord.ClientAddr(), "--creds", w.creds}, args...)...)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("fleet-admin %s: %v", strings.Join(args, " "), err)
		}
		return string(out)
	})
	w.site, w.server = "berlin", leafURL
	w.addDevices("site-a", "site-b")
	sysA, sysB := w.build(0, "site-sys-a"), w.build(1, "site-sys-b")
	if _, errs, err := w.admin("release", "create", "--name", "rel-site", "--push", "--closure", "site-a="+sysA.Path, "--closure", "site-b="+sysB.Path); err != nil {
		t.Fatalf("release create --push: %v\n%s", err, errs)
	}
	for i, s := range []nixtest.System{sysA, sysB} {
		if err := w.envs[i].Delete(w.ctx, s.Path); err != nil {
			t.Fatal(err)
		}
	}
	// The copy holds both before the deploy.
	var pushed int64
	obs, err := w.coord.JetStream().ObjectStore(w.ctx, subjects.ObjectCache)
	if err != nil {
		t.Fatal(err)
	}
	infos, err := obs.List(w.ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range infos {
		pushed += int64(in.Size)
	}
	siteAdmin, err := w.coord.Authority().CoreUser("test-site-admin")
	if err != nil {
		t.Fatal(err)
	}
	sjs, err := jetstream.New(connectCreds(t, leafURL, siteAdmin, ""))
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 30*time.Second, "the site's copy filled", func() bool {
		ni, err1 := sjs.Stream(w.ctx, subjects.StreamSiteNarInfo)
		obj, err2 := sjs.Stream(w.ctx, subjects.StreamSiteCache)
		return err1 == nil && err2 == nil && ni.CachedInfo().State.Msgs >= 2 && obj.CachedInfo().State.Bytes >= uint64(pushed)
	})
	out0 := leafOut(t, w.coord)

	if out, errs, err := w.admin("deploy", "--release", "rel-site", "--group", "cache", "--strategy", "all", "--wait"); err != nil {
		t.Fatalf("deploy --wait: %v\n%s\n%s", err, out, errs)
	}
	for i, s := range []nixtest.System{sysA, sysB} {
		if !w.switched(i, s) || nixtest.Readlink(w.envs[i].CurrentSystem) != s.Path {
			t.Fatalf("%s did not switch to %s: %q", w.hosts[i], s.Path, w.envs[i].Switches())
		}
	}
	if v := sentTo(t, w.coord, "berlin"); v != 0 {
		t.Fatalf("the coordinator sent berlin %v NAR bytes: the agents did not read the site's copy", v)
	}
	// The site's hits show at the hub, as the agents report them.
	fetched := func(name, source string) float64 {
		v, _, err := promvalue.Get(w.coord.Metrics(), name, map[string]string{"site": "berlin", "source": source})
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	poll.Until(t, 10*time.Second, "berlin's hits in the metrics", func() bool {
		return fetched("fleet_cache_fetched_paths_total", "site") >= 2 && fetched("fleet_cache_fetched_bytes_total", "site") >= float64(pushed)
	})
	if h, b := fetched("fleet_cache_fetched_paths_total", "hub"), fetched("fleet_cache_fetched_bytes_total", "hub"); h != 0 || b != 0 {
		t.Fatalf("berlin's devices read %v paths, %v bytes from the hub", h, b)
	}
	// The deploy's own messages (desired states, events) only: these
	// closures are small; TestSiteCacheLeaf measures a large one.
	if d := leafOut(t, w.coord) - out0; d > 64<<10 {
		t.Fatalf("the deploy took %d bytes across the leaf links (closures: %d)", d, pushed)
	}
}
