package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

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

// cacheWorld is a coordinator whose devices fetch only from the fleet
// cache: no HTTP binary cache runs. Each device has its own Nix sandbox
// (current-system link, profile, switch log) in the one Nix store; every
// device trusts the key of sandbox 0.
type cacheWorld struct {
	t     *testing.T
	ctx   context.Context
	coord *broker.Coordinator
	creds string
	envs  []*nixtest.Env
	hosts []string
	ids   []string
	// site is where the devices are, server what their agents connect to.
	site, server string
}

func newCacheWorld(t *testing.T, hosts ...string) *cacheWorld {
	t.Helper()
	w := newCacheCoordinator(t, nil)
	w.addDevices(hosts...)
	return w
}

// newCacheCoordinator starts the coordinator of a cache world (tweak
// changes its config); addDevices adds the devices.
func newCacheCoordinator(t *testing.T, tweak func(*broker.Config)) *cacheWorld {
	t.Helper()
	nixtest.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	cfg := broker.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Listen = "127.0.0.1:0"
	cfg.HTTP = ""
	if tweak != nil {
		tweak(&cfg)
	}
	coord, err := broker.Start(ctx, cfg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(coord.Close)
	return &cacheWorld{t: t, ctx: ctx, coord: coord, creds: filepath.Join(cfg.DataDir, accounts.AdminCredsFile),
		site: subjects.DefaultSite, server: "nats://" + coord.ClientAddr()}
}

// addDevices records a device per host at w.site, each with its own Nix
// sandbox and an agent connected to w.server.
func (w *cacheWorld) addDevices(hosts ...string) {
	t, ctx, coord := w.t, w.ctx, w.coord
	t.Helper()
	devKV, err := coord.JetStream().KeyValue(ctx, subjects.BucketDevices)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts {
		env, err := nixtest.New(ctx, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		// Over NATS only: no HTTP cache is there to fall back on.
		if err := env.Close(); err != nil {
			t.Fatal(err)
		}
		w.envs = append(w.envs, env)
		w.hosts = append(w.hosts, h)
		cr, err := coord.Authority().NewUser(subjects.RoleAgent, h, 0)
		if err != nil {
			t.Fatal(err)
		}
		if w.site != subjects.DefaultSite {
			if cr.JWT, err = coord.Authority().IssueSiteUser(subjects.RoleAgent, cr.PublicKey(), h, w.site, 0); err != nil {
				t.Fatal(err)
			}
		}
		rec, _ := json.Marshal(model.Device{ID: cr.PublicKey(), Name: h, Groups: []string{"cache"}, Site: w.site,
			Status: model.DeviceActive, EnrolledAt: time.Now().UTC()})
		if _, err := devKV.Put(ctx, cr.PublicKey(), rec); err != nil {
			t.Fatal(err)
		}
		w.ids = append(w.ids, cr.PublicKey())
		base, err := env.Build(ctx, "base-"+h, nixtest.BuildOpts{})
		if err != nil {
			t.Fatal(err)
		}
		if err := env.Install(ctx, base); err != nil {
			t.Fatal(err)
		}
		w.startAgent(env, h, cr)
	}
}

// nixConfig trusts sandbox 0's key.
func (w *cacheWorld) nixConfig(env *nixtest.Env) []string {
	out := []string{}
	for _, kv := range env.Environ() {
		if strings.HasPrefix(kv, "NIX_CONFIG=") {
			kv = strings.Replace(kv, "trusted-public-keys = "+env.TrustedKey.Public, "trusted-public-keys = "+w.envs[0].TrustedKey.Public, 1)
		}
		out = append(out, kv)
	}
	return out
}

func (w *cacheWorld) startAgent(env *nixtest.Env, host string, cr *accounts.Creds) {
	w.t.Helper()
	state := w.t.TempDir()
	if err := accounts.WriteCreds(filepath.Join(state, agent.CredsFile), cr); err != nil {
		w.t.Fatal(err)
	}
	owner, err := accounts.ReadCreds(w.creds)
	if err != nil {
		w.t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(state, "agent.log"))
	if err != nil {
		w.t.Fatal(err)
	}
	cmd := exec.Command(agentBin, "--log-format", "json", "run",
		"--server", w.server, "--state-dir", state, "--release-signer", owner.PublicKey(),
		"--hostname", host, "--profile", env.Profile, "--current-system", env.CurrentSystem,
		"--booted-system", env.CurrentSystem, "--facts-interval", "1m", "--reconnect-within", "10s",
		"--apply-timeout", "1m", "--recheck", "1m")
	cmd.Env = w.nixConfig(env)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		w.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	w.t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		logf.Close()
		if w.t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			w.t.Logf("agent %s log:\n%s", host, tail(string(b), 3000))
		}
	})
}

// admin runs the fleet-admin binary as the owner, with Nix trusting
// sandbox 0's key (for the staging copy).
func (w *cacheWorld) admin(args ...string) (string, string, error) {
	cmd := exec.CommandContext(w.ctx, adminBin, append([]string{"--server", "nats://" + w.coord.ClientAddr(), "--creds", w.creds}, args...)...)
	cmd.Env = append(w.nixConfig(w.envs[0]), "FLEET_YES=1")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

func (w *cacheWorld) mustAdmin(args ...string) string {
	w.t.Helper()
	out, errs, err := w.admin(args...)
	if err != nil {
		w.t.Fatalf("fleet-admin %s: %v\n%s", strings.Join(args, " "), err, errs)
	}
	return out
}

// build builds a system in device i's sandbox and signs it with sandbox
// 0's key, as CI would before a push.
func (w *cacheWorld) build(i int, name string) nixtest.System {
	w.t.Helper()
	s, err := w.envs[i].Build(w.ctx, name, nixtest.BuildOpts{})
	if err != nil {
		w.t.Fatal(err)
	}
	cmd := exec.CommandContext(w.ctx, "nix", "store", "sign", "--key-file", w.envs[0].TrustedKey.SecretFile, s.Path)
	cmd.Env = w.envs[0].Environ()
	if out, err := cmd.CombinedOutput(); err != nil {
		w.t.Fatalf("sign %s: %v\n%s", s.Path, err, out)
	}
	return s
}

func (w *cacheWorld) switched(i int, s nixtest.System) bool {
	return slices.ContainsFunc(w.envs[i].Switches(), func(l string) bool { return strings.HasSuffix(l, " "+s.Path) })
}

func cacheReads(t *testing.T, c *broker.Coordinator) float64 {
	t.Helper()
	v, _, err := promvalue.Get(c.Metrics(), "fleet_cache_requests_total", map[string]string{"site": "hub", "kind": "nar", "result": "hit"})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// A release pushed with --push is fetched by two agents over their NATS
// connections alone (no HTTP cache runs), checked by Nix against the key
// they trust, and switched to. A NAR file tampered with in the cache is
// refused: the agent reports the failure and stays on its system.
func TestFleetCacheOverNATS(t *testing.T) {
	w := newCacheWorld(t, "cache-a", "cache-b")
	sysA, sysB := w.build(0, "sys-a"), w.build(1, "sys-b")
	out, errs, err := w.admin("--json", "release", "create", "--name", "rel-cache", "--push",
		"--closure", "cache-a="+sysA.Path, "--closure", "cache-b="+sysB.Path)
	if err != nil {
		t.Fatalf("release create --push: %v\n%s", err, errs)
	}
	var rv model.ReleaseView
	if err := json.Unmarshal([]byte(out), &rv); err != nil || !rv.FleetCache {
		t.Fatalf("release: %v %s", err, out)
	}
	if !strings.Contains(errs, "2 pushed") {
		t.Fatalf("push progress: %q", errs)
	}
	// Only the fleet cache has them now.
	for i, s := range []nixtest.System{sysA, sysB} {
		if err := w.envs[i].Delete(w.ctx, s.Path); err != nil {
			t.Fatal(err)
		}
	}

	if out, errs, err := w.admin("deploy", "--release", "rel-cache", "--group", "cache", "--strategy", "all", "--wait"); err != nil {
		t.Fatalf("deploy --wait: %v\n%s\n%s", err, out, errs)
	}
	for i, s := range []nixtest.System{sysA, sysB} {
		if !w.switched(i, s) || nixtest.Readlink(w.envs[i].CurrentSystem) != s.Path {
			t.Fatalf("%s did not switch to %s: %q", w.hosts[i], s.Path, w.envs[i].Switches())
		}
	}
	if n := cacheReads(t, w.coord); n < 2 {
		t.Fatalf("NAR windows read over NATS: %v, want one per device at least", n)
	}
	var rep model.CacheReport
	if err := json.Unmarshal([]byte(w.mustAdmin("--json", "cache", "ls")), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.NarInfos != 2 || len(rep.Releases) != 1 || rep.Releases[0].Release != "rel-cache" || rep.Releases[0].Paths != 2 {
		t.Fatalf("cache ls: %+v", rep)
	}

	// Tampered: the NAR file of a pushed path is replaced in the object
	// store (same size, other bytes); its narinfo is unchanged.
	sysC := w.build(0, "sys-c")
	w.mustAdmin("cache", "push", sysC.Path)
	if err := w.envs[0].Delete(w.ctx, sysC.Path); err != nil {
		t.Fatal(err)
	}
	w.tamper(sysC.Path)
	w.mustAdmin("release", "create", "--name", "rel-tampered", "--fleet-cache", "--closure", "cache-a="+sysC.Path)
	out, errs, err = w.admin("deploy", "--release", "rel-tampered", "--device", w.ids[0], "--wait")
	if exitCodeOf(err) != 3 { // paused: the one device failed
		t.Fatalf("deploy of a tampered closure: exit %d\n%s\n%s", exitCodeOf(err), out, errs)
	}
	var ro model.RolloutView
	out = w.mustAdmin("--json", "rollout", "ls")
	var ros []model.Rollout
	if err := json.Unmarshal([]byte(out), &ros); err != nil {
		t.Fatal(err)
	}
	for _, r := range ros {
		if r.ReleaseID == "rel-tampered" {
			if err := json.Unmarshal([]byte(w.mustAdmin("--json", "rollout", "show", r.ID)), &ro); err != nil {
				t.Fatal(err)
			}
		}
	}
	if len(ro.Progress) != 1 || !strings.Contains(ro.Progress[0].Error, "does not match its narinfo") {
		t.Fatalf("tampered rollout: %+v", ro.Progress)
	}
	if w.switched(0, sysC) || nixtest.Readlink(w.envs[0].CurrentSystem) != sysA.Path || w.envs[0].Valid(w.ctx, sysC.Path) {
		t.Fatalf("the tampered closure was taken: switches %q", w.envs[0].Switches())
	}
}

// tamper replaces the NAR file of path in the fleet cache with as many
// other bytes.
func (w *cacheWorld) tamper(path string) {
	w.t.Helper()
	kv, err := w.coord.JetStream().KeyValue(w.ctx, subjects.BucketNarInfo)
	if err != nil {
		w.t.Fatal(err)
	}
	e, err := kv.Get(w.ctx, strings.TrimPrefix(path, "/nix/store/")[:32])
	if err != nil {
		w.t.Fatal(err)
	}
	ni, err := model.ParseNarInfo(e.Value())
	if err != nil {
		w.t.Fatal(err)
	}
	obs, err := w.coord.JetStream().ObjectStore(w.ctx, subjects.ObjectCache)
	if err != nil {
		w.t.Fatal(err)
	}
	junk := make([]byte, ni.FileSize)
	_, _ = rand.Read(junk)
	if _, err := obs.PutBytes(w.ctx, ni.URL, junk); err != nil {
		w.t.Fatal(err)
	}
	poll.Until(w.t, 5*time.Second, "tampered file stored", func() bool {
		info, err := obs.GetInfo(w.ctx, ni.URL)
		return err == nil && int64(info.Size) == ni.FileSize
	})
}
