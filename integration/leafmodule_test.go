package integration

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"fleet/internal/poll"
	"fleet/subjects"
)

// The unit's paths, as leaf.nix writes them.
const (
	leafUnitRuntimeConf = "/run/fleet-leaf/nats.conf"
	leafUnitCredsDir    = "/run/credentials/fleet-leaf.service"
	leafUnitStateDir    = "/var/lib/fleet-leaf"
)

// leafUnitConf does what systemd does before nats-server starts: each
// LoadCredential entry is copied into a credentials directory, and the
// unit's ExecStartPre writes nats.conf. The unit's directories
// (/run/fleet-leaf, /run/credentials/fleet-leaf.service, /var/lib/fleet-leaf)
// are moved into dir; the config, with those paths rewritten, is returned
// with the state directory (nats-server's working directory).
func leafUnitConf(t *testing.T, u unit, dir string) (conf, stateDir string) {
	t.Helper()
	credsDir := filepath.Join(dir, "credentials")
	stateDir = filepath.Join(dir, "state")
	for _, d := range []string{credsDir, stateDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	for _, lc := range u["Service"]["LoadCredential"] {
		name, src, ok := strings.Cut(lc, ":")
		if !ok {
			t.Fatalf("LoadCredential=%q", lc)
		}
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatalf("LoadCredential=%q: %v", lc, err)
		}
		if err := os.WriteFile(filepath.Join(credsDir, name), b, 0o400); err != nil {
			t.Fatal(err)
		}
	}
	pre := u.get("Service", "ExecStartPre")
	script, err := os.ReadFile(strings.Trim(pre, `"`))
	if err != nil {
		t.Fatalf("ExecStartPre=%s: %v", pre, err)
	}
	conf = filepath.Join(dir, "nats.conf")
	prepare := filepath.Join(dir, "prepare.sh")
	if err := os.WriteFile(prepare, []byte(strings.ReplaceAll(string(script), leafUnitRuntimeConf, conf)), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("bash", prepare).CombinedOutput(); err != nil {
		t.Fatalf("ExecStartPre: %v\n%s", err, out)
	}
	b, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.NewReplacer(leafUnitCredsDir, credsDir, leafUnitStateDir, stateDir).Replace(string(b))
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return conf, stateDir
}

// Issue 14: the leaf module's generated mode gets live account updates like
// its configFile mode. A coordinator, the site's files from `fleet-admin
// leaf config`, the leaf module evaluated in generated mode on them, and
// its nats.conf run by the real nats-server: a device enrols and runs
// through the leaf, is revoked at the hub, and is cut off at the leaf and
// refused there after, within seconds and without restarting the leaf.
func TestNixOSLeafModuleLiveRevocation(t *testing.T) {
	w := newFleetWorldLeaf(t)
	site := filepath.Join(t.TempDir(), "berlin")
	var lc struct {
		FleetAccount  string `json:"fleet_account"`
		SystemAccount string `json:"system_account"`
	}
	if err := json.Unmarshal([]byte(w.mustAdmin("--json", "leaf", "config", "--site", "berlin", "--out", site)), &lc); err != nil {
		t.Fatal(err)
	}
	hub := w.hubLeafURL(t, site)
	leafListen, monitor := freeAddr(t), freeAddr(t)

	r := mustEvalNixOS(t, "leaf.nix", siteLeafModule(site, hub, lc.FleetAccount, lc.SystemAccount, leafListen, monitor, `serverName = "leaf-berlin";`))
	if len(r.Warnings) != 0 {
		t.Errorf("warnings %q with systemCredentialsFile set", r.Warnings)
	}
	u := parseUnit(t, r.Units["fleet-leaf.service"])
	if got := u["Service"]["LoadCredential"]; !slices.Equal(got, []string{
		"leaf.creds:" + filepath.Join(site, "leaf.creds"), "leaf-system.creds:" + filepath.Join(site, "leaf-system.creds")}) {
		t.Errorf("LoadCredential=%q", got)
	}
	if u.get("Service", "StateDirectory") != "fleet-leaf" {
		t.Errorf("StateDirectory=%q", u.get("Service", "StateDirectory"))
	}
	args := execArgs(t, u.get("Service", "ExecStart"))
	if argAfter(t, args, "-c") != leafUnitRuntimeConf {
		t.Fatalf("ExecStart=%q", args)
	}
	conf, stateDir := leafUnitConf(t, u, t.TempDir())
	text, _ := os.ReadFile(conf)
	for _, want := range []string{
		`type: cache, dir: "` + filepath.Join(stateDir, "jwt") + `"`,
		`credentials: "` + filepath.Join(filepath.Dir(conf), "credentials", "leaf-system.creds") + `"`,
		`account: "` + lc.SystemAccount + `"`,
		lc.SystemAccount + `: "ey`, lc.FleetAccount + `: "ey`,
	} {
		if !strings.Contains(string(text), want) {
			t.Errorf("nats.conf lacks %q:\n%s", want, text)
		}
	}

	exited, leafLog := runLeafUnit(t, conf, stateDir)
	// Both remotes up: the FLEET one and the system one.
	poll.Until(w.t, 20*time.Second, "leaf node up with its two remotes", func() bool {
		var lz struct {
			Leafs []struct {
				Account string `json:"account"`
			} `json:"leafs"`
		}
		if !getJSON("http://"+monitor+"/leafz", &lz) {
			return false
		}
		var accs []string
		for _, l := range lz.Leafs {
			accs = append(accs, l.Account)
		}
		slices.Sort(accs)
		want := []string{lc.FleetAccount, lc.SystemAccount}
		slices.Sort(want)
		return slices.Equal(accs, want)
	})

	// A device at the site, enrolled and running through the leaf.
	token := strings.TrimSpace(w.mustAdmin("token", "create", "--group", "berlin", "--site", "berlin", "--uses", "1", "--ttl", "1h"))
	leafURL := "nats://" + leafListen
	dev, cr := w.startDevice("berlin-1", token, leafURL, fakePath("gen1"))
	connected := func() bool {
		var cz struct {
			Conns []struct {
				User string `json:"authorized_user"`
			} `json:"connections"`
		}
		if !getJSON("http://"+monitor+"/connz?auth=true&acc="+lc.FleetAccount, &cz) {
			t.Fatal("leaf monitor: /connz failed")
		}
		return slices.ContainsFunc(cz.Conns, func(c struct {
			User string `json:"authorized_user"`
		}) bool {
			return c.User == dev.id
		})
	}
	poll.Until(w.t, 10*time.Second, "device's agent connected at the leaf", connected)
	seed, _ := cr.Key.Seed()
	closed := make(chan struct{})
	asyncErrs := make(chan error, 8)
	probe, err := nats.Connect(leafURL, nats.UserJWTAndSeed(cr.JWT, string(seed)), nats.NoReconnect(),
		nats.CustomInboxPrefix(cr.InboxPrefix()), nats.ClosedHandler(func(*nats.Conn) { close(closed) }),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case asyncErrs <- err:
			default:
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()

	// Revoked at the hub: cut off at the leaf at once, and refused there.
	w.mustAdmin("devices", "revoke", "berlin-1")
	revoked := time.Now()
	poll.Until(w.t, 5*time.Second, "revoked device's connections closed at the leaf", func() bool {
		select {
		case <-closed:
			return !connected()
		default:
			return false
		}
	})
	poll.Until(w.t, 5*time.Second, "revoked device refused at the leaf", func() bool {
		c, err := nats.Connect(leafURL, nats.UserJWTAndSeed(cr.JWT, string(seed)), nats.NoReconnect(), nats.Timeout(2*time.Second))
		if err == nil {
			c.Close()
			return false
		}
		return strings.Contains(strings.ToLower(err.Error()), "authorization")
	})
	select {
	case err := <-asyncErrs:
		if !strings.Contains(err.Error(), "revoked") {
			t.Errorf("the leaf closed the device's connection with %v, not a revocation", err)
		}
	default:
		t.Errorf("the leaf closed the device's connection without an error")
	}
	// The agent's own reconnects are refused too: it stays off the leaf.
	if connected() {
		t.Fatal("the revoked device's agent is connected at the leaf again")
	}
	// And this was the running leaf, never restarted.
	select {
	case <-exited:
		t.Fatal("the leaf exited")
	default:
	}
	if n := strings.Count(leafLog.String(), "Server is ready"); n != 1 {
		t.Fatalf("leaf started %d times", n)
	}
	t.Logf("revocation effective at the leaf %v after fleet-admin devices revoke returned", time.Since(revoked).Round(time.Millisecond))
}

func getJSON(url string, v any) bool {
	resp, err := http.Get(url)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false
	}
	return json.NewDecoder(resp.Body).Decode(v) == nil
}

// The leaf module with a copy of the binary cache: the site's files from
// `fleet-admin leaf config --cache`, the module evaluated in generated
// mode on them, its nats.conf run by the real nats-server. The leaf comes
// up with JetStream in the site's domain and three remotes (FLEET,
// system, CORE), and the hub creates the site's two mirrors over the CORE
// link.
func TestNixOSLeafModuleCache(t *testing.T) {
	w := newFleetWorldWith(t, "--leafnode-listen", freeAddr(t))
	site := filepath.Join(t.TempDir(), "berlin")
	var lc struct {
		FleetAccount  string `json:"fleet_account"`
		SystemAccount string `json:"system_account"`
		CoreAccount   string `json:"core_account"`
	}
	if err := json.Unmarshal([]byte(w.mustAdmin("--json", "leaf", "config", "--site", "berlin", "--out", site,
		"--cache", "--cache-max-bytes", "256MiB")), &lc); err != nil {
		t.Fatal(err)
	}
	if lc.CoreAccount == "" {
		t.Fatal("leaf config --cache --json names no core_account")
	}
	// The figures leaf.conf names, as the option's description says.
	written, err := os.ReadFile(filepath.Join(site, "leaf.conf"))
	if err != nil {
		t.Fatal(err)
	}
	figure := func(key string) string {
		m := regexp.MustCompile(key + `: (\d+)`).FindSubmatch(written)
		if m == nil {
			t.Fatalf("leaf.conf has no %s:\n%s", key, written)
		}
		return string(m[1])
	}
	hub := w.hubLeafURL(t, site)
	leafListen, monitor := freeAddr(t), freeAddr(t)
	r := mustEvalNixOS(t, "leaf.nix", siteLeafModule(site, hub, lc.FleetAccount, lc.SystemAccount, leafListen, monitor, fmt.Sprintf(`cache = {
        credentialsFile = %q;
        site = "berlin";
        coreAccount = %q;
        maxFileStore = %s;
        maxMemoryStore = %s;
      };`, filepath.Join(site, "leaf-cache.creds"), lc.CoreAccount, figure("max_file_store"), figure("max_memory_store"))))
	u := parseUnit(t, r.Units["fleet-leaf.service"])
	if got := u["Service"]["LoadCredential"]; !slices.Contains(got, "leaf-cache.creds:"+filepath.Join(site, "leaf-cache.creds")) {
		t.Errorf("LoadCredential=%q", got)
	}
	conf, stateDir := leafUnitConf(t, u, t.TempDir())
	text, _ := os.ReadFile(conf)
	for _, want := range []string{
		`domain: "berlin"`, `store_dir: "` + filepath.Join(stateDir, "jetstream") + `"`,
		`credentials: "` + filepath.Join(filepath.Dir(conf), "credentials", "leaf-cache.creds") + `"`,
		`account: "` + lc.CoreAccount + `"`, lc.CoreAccount + `: "ey`,
	} {
		if !strings.Contains(string(text), want) {
			t.Errorf("nats.conf lacks %q:\n%s", want, text)
		}
	}
	runLeafUnit(t, conf, stateDir)
	poll.Until(t, 30*time.Second, "three remotes up, and the site's two mirrors made over the cache link", func() bool {
		var lz struct {
			Leafs []struct {
				Account string `json:"account"`
			} `json:"leafs"`
		}
		if !getJSON("http://"+monitor+"/leafz", &lz) || len(lz.Leafs) != 3 {
			return false
		}
		var jz struct {
			Accounts []struct {
				Streams []struct {
					Name string `json:"name"`
				} `json:"stream_detail"`
			} `json:"account_details"`
		}
		if !getJSON("http://"+monitor+"/jsz?accounts=true&streams=true", &jz) {
			return false
		}
		var names []string
		for _, a := range jz.Accounts {
			for _, st := range a.Streams {
				names = append(names, st.Name)
			}
		}
		return slices.Contains(names, subjects.StreamSiteCache) && slices.Contains(names, subjects.StreamSiteNarInfo)
	})
}

// runLeafUnit runs the real nats-server on the unit's nats.conf (from
// leafUnitConf) in its state directory until the test ends, and shows its
// log and config when the test failed. It returns a channel closed when
// the server exits, and its output.
func runLeafUnit(t *testing.T, conf, stateDir string) (<-chan struct{}, *procOutput) {
	t.Helper()
	text, _ := os.ReadFile(conf)
	leaf := exec.Command(natsServerBin, "-c", conf)
	leaf.Dir = stateDir
	var leafLog procOutput
	leaf.Stdout, leaf.Stderr = &leafLog, &leafLog
	if err := leaf.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = leaf.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = leaf.Process.Signal(syscall.SIGTERM)
		<-exited
		if t.Failed() {
			t.Logf("leaf log:\n%s\n--- nats.conf:\n%s", tail(leafLog.String(), 3000), text)
		}
	})
	return exited, &leafLog
}

// siteLeafModule is the leaf module's generated mode on the files
// fleet-admin leaf config wrote to site, for a leaf listening on listen
// (monitoring on monitor) and linked to hub, with more options in extra.
func siteLeafModule(site, hub, fleetAccount, systemAccount, listen, monitor, extra string) string {
	return fmt.Sprintf(`{
    services.fleet-leaf = {
      enable = true;
      hubUrls = [ %q ];
      credsFile = %q;
      systemCredentialsFile = %q;
      account = %q;
      systemAccount = %q;
      operatorJwtFile = %q;
      accountJwtDir = %q;
      listen = %q;
      monitorListen = %q;
      %s
    };
  }`, hub, filepath.Join(site, "leaf.creds"), filepath.Join(site, "leaf-system.creds"), fleetAccount, systemAccount,
		filepath.Join(site, "operator.jwt"), filepath.Join(site, "jwt"), listen, monitor, extra)
}
