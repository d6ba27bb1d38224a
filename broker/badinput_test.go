package broker

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"fleet/accounts"
	"fleet/internal/dirlock"
	"fleet/internal/dirstate"
	"fleet/subjects"
)

// initDir makes an initialised data dir, as `fleet-coordinator init` does.
func initDir(t *testing.T) (string, *accounts.Authority) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	a, err := Init(testConfig(dir))
	if err != nil {
		t.Fatalf("Init: %v", err)
	}
	return dir, a
}

// copyDir copies an initialised dir so each case can damage its own.
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "data")
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	return dst
}

// occupy listens on a free local port for the rest of the test.
func occupy(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.Addr().String()
}

func TestInitRefusesInitialisedDir(t *testing.T) {
	dir, _ := initDir(t)
	before := dirstate.Take(t, dir)
	_, err := Init(testConfig(dir))
	wantErr(t, err, dir)
	dirstate.Unchanged(t, before, dirstate.Take(t, dir))

	// A dir that holds only JetStream data belongs to a lost fleet: a new
	// identity would orphan it.
	orphan := filepath.Join(t.TempDir(), "data")
	if err := os.MkdirAll(filepath.Join(orphan, jetstreamDir, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	before = dirstate.Take(t, orphan)
	_, err = Init(testConfig(orphan))
	wantErr(t, err, filepath.Join(orphan, jetstreamDir))
	dirstate.Unchanged(t, before, dirstate.Take(t, orphan))
}

func TestStartRefusesDamagedDir(t *testing.T) {
	dir0, a := initDir(t)
	fleetJWT := filepath.Join(accounts.ResolverDir, a.FleetAccount()+".jwt")
	sysJWT := filepath.Join(accounts.ResolverDir, a.SystemAccount()+".jwt")
	agentKey := filepath.Join(accounts.KeysDir, "role-agent.nk")
	signingKey := filepath.Join(accounts.KeysDir, "operator-signing.nk")
	remove := func(t *testing.T, p string) {
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
	}
	write := func(b string) func(t *testing.T, p string) {
		return func(t *testing.T, p string) {
			if err := os.WriteFile(p, []byte(b), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	cases := []struct {
		name   string
		file   string // relative to the dir; the error must name it
		damage func(t *testing.T, p string)
	}{
		{"operator jwt removed, keys kept", accounts.OperatorJWTFile, remove},
		{"operator jwt garbage", accounts.OperatorJWTFile, write("not a jwt\n")},
		{"agent role key removed", agentKey, remove},
		{"agent role key garbage", agentKey, write("SUgarbage\n")},
		{"operator signing key empty", signingKey, write("")},
		{"fleet account jwt damaged", fleetJWT, write("eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.AAAA")},
		{"fleet account jwt removed", fleetJWT, remove},
		{"system account jwt damaged", sysJWT, write("garbage")},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyDir(t, dir0)
			p := filepath.Join(dir, tc.file)
			tc.damage(t, p)
			before := dirstate.Take(t, dir)
			c, err := Start(context.Background(), testConfig(dir), testLogger(t))
			if err == nil {
				c.Close()
				t.Fatal("Start on a damaged dir succeeded")
			}
			wantErr(t, err, p)
			dirstate.Unchanged(t, before, dirstate.Take(t, dir))
		})
	}
}

func TestStartRefusesBusyPorts(t *testing.T) {
	for _, flag := range []string{"--listen", "--http", "--leafnode-listen"} {
		t.Run(flag, func(t *testing.T) {
			busy := occupy(t)
			set := func(cfg *Config) {
				switch flag {
				case "--listen":
					cfg.Listen = busy
				case "--http":
					cfg.HTTP = busy
				case "--leafnode-listen":
					cfg.LeafnodeListen = busy
				}
			}
			// On a fresh dir nothing is created.
			fresh := filepath.Join(t.TempDir(), "data")
			cfg := testConfig(fresh)
			set(&cfg)
			c, err := Start(context.Background(), cfg, testLogger(t))
			if err == nil {
				c.Close()
				t.Fatalf("Start with a busy %s succeeded", flag)
			}
			wantErr(t, err, flag, busy)
			if _, err := os.Stat(fresh); !os.IsNotExist(err) {
				t.Errorf("a failed start created %s", fresh)
			}
			// On an initialised dir nothing changes.
			dir, _ := initDir(t)
			before := dirstate.Take(t, dir)
			cfg = testConfig(dir)
			set(&cfg)
			c, err = Start(context.Background(), cfg, testLogger(t))
			if err == nil {
				c.Close()
				t.Fatalf("Start with a busy %s succeeded", flag)
			}
			wantErr(t, err, flag, busy)
			dirstate.Unchanged(t, before, dirstate.Take(t, dir))
		})
	}
}

func TestConfigValidate(t *testing.T) {
	ok := DefaultConfig()
	if err := ok.Validate(); err != nil {
		t.Fatalf("default config: %v", err)
	}
	for _, good := range []func(*Config){
		func(c *Config) { c.HTTP = "" },
		func(c *Config) { c.Replicas = 3 },
		func(c *Config) { c.Listen = ":4222" },
		func(c *Config) { c.Listen, c.HTTP, c.LeafnodeListen = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0" },
		func(c *Config) { c.Listen = "[::1]:4222" },
		func(c *Config) { c.Domain = "site_1-a" },
		func(c *Config) { c.LeafnodeListen = "0.0.0.0:7422" },
		func(c *Config) { c.ServerName, c.ClusterListen, c.Replicas = "c1", "0.0.0.0:6222", 3 },
		func(c *Config) {
			c.ServerName, c.ClusterListen = "c1", "127.0.0.1:0"
			c.Routes = []string{"nats-route://10.0.0.2:6222", "nats-route://c3.example:6222"}
		},
	} {
		c := DefaultConfig()
		good(&c)
		if err := c.Validate(); err != nil {
			t.Errorf("valid config %+v refused: %v", c, err)
		}
	}
	cases := []struct {
		flag string
		set  func(*Config)
	}{
		{"--data-dir", func(c *Config) { c.DataDir = "" }},
		{"--listen", func(c *Config) { c.Listen = "nope" }},
		{"--listen", func(c *Config) { c.Listen = "" }},
		{"--listen", func(c *Config) { c.Listen = "127.0.0.1:99999" }},
		{"--listen", func(c *Config) { c.Listen = "127.0.0.1:-1" }},
		{"--listen", func(c *Config) { c.Listen = "127.0.0.1:http" }},
		{"--http", func(c *Config) { c.HTTP = "localhost" }},
		{"--leafnode-listen", func(c *Config) { c.LeafnodeListen = "1.2.3.4" }},
		{"--http", func(c *Config) { c.HTTP = "127.0.0.1:4222" }},                    // same port as --listen
		{"--leafnode-listen", func(c *Config) { c.LeafnodeListen = "0.0.0.0:4222" }}, // same port as --listen
		{"--domain", func(c *Config) { c.Domain = "" }},
		{"--domain", func(c *Config) { c.Domain = "a.b" }},
		{"--domain", func(c *Config) { c.Domain = "a b" }},
		{"--domain", func(c *Config) { c.Domain = "*" }},
		{"--domain", func(c *Config) { c.Domain = ">" }},
		{"--server-name", func(c *Config) { c.ServerName = "a.b" }},
		{"--replicas", func(c *Config) { c.Replicas = 2 }},
		{"--replicas", func(c *Config) { c.Replicas = 0 }},
		{"--replicas", func(c *Config) { c.Replicas = -1 }},
		{"--routes", func(c *Config) { c.Routes = []string{"nats-route://10.0.0.2:6222"} }}, // no --cluster-listen
		{"--cluster-listen", func(c *Config) { c.ServerName, c.ClusterListen = "c1", "6222" }},
		{"--cluster-listen", func(c *Config) { c.ServerName, c.ClusterListen = "c1", "0.0.0.0:4222" }}, // same port as --listen
		{"--server-name", func(c *Config) { c.ClusterListen = "0.0.0.0:6222" }},
		{"--cluster-name", func(c *Config) { c.ServerName, c.ClusterListen, c.ClusterName = "c1", "0.0.0.0:6222", "a.b" }},
		{"--routes", func(c *Config) {
			c.ServerName, c.ClusterListen, c.Routes = "c1", "0.0.0.0:6222", []string{"10.0.0.2:6222"}
		}},
		{"--routes", func(c *Config) {
			c.ServerName, c.ClusterListen, c.Routes = "c1", "0.0.0.0:6222", []string{"nats-route://10.0.0.2"}
		}},
		{"--facts-retention", func(c *Config) { c.FactsRetention = 0 }},
		{"--facts-retention", func(c *Config) { c.FactsRetention = -time.Hour }},
		{"--facts-history", func(c *Config) { c.FactsHistory = 0 }},
		{"--events-retention", func(c *Config) { c.EventsRetention = 0 }},
		{"max payload", func(c *Config) { c.Limits.MaxPayload = 0 }},
		{"max payload", func(c *Config) { c.Limits.MaxPayload = 1 << 31 }},
	}
	for _, tc := range cases {
		c := DefaultConfig()
		tc.set(&c)
		err := c.Validate()
		if err == nil {
			t.Errorf("config %+v accepted; want an error naming %s", c, tc.flag)
			continue
		}
		if !strings.Contains(err.Error(), tc.flag) {
			t.Errorf("error %q does not name %s", err, tc.flag)
		}
		// Start and Init refuse it before touching anything.
		dir := filepath.Join(t.TempDir(), "data")
		if c.DataDir != "" {
			c.DataDir = dir
		}
		if co, err := Start(context.Background(), c, testLogger(t)); err == nil {
			co.Close()
			t.Errorf("Start accepted %+v", c)
		}
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("Start with a bad %s created %s", tc.flag, dir)
		}
	}
}

// runMain runs the CLI and returns its exit code and output.
func runMain(args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestMainInitTwice(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	code, out, errOut := runMain("init", "--data-dir", dir)
	if code != 0 {
		t.Fatalf("first init: exit %d: %s", code, errOut)
	}
	if !strings.Contains(out, filepath.Join(dir, accounts.AdminCredsFile)) || !strings.Contains(out, accounts.OperatorSeedFile) {
		t.Errorf("init output does not point at the creds and the operator seed:\n%s", out)
	}
	if _, err := accounts.ReadCreds(filepath.Join(dir, accounts.AdminCredsFile)); err != nil {
		t.Fatal(err)
	}
	before := dirstate.Take(t, dir)
	code, _, errOut = runMain("init", "--data-dir", dir)
	if code == 0 {
		t.Fatal("second init succeeded")
	}
	if !strings.Contains(errOut, filepath.Join(dir, accounts.OperatorJWTFile)) && !strings.Contains(errOut, dir) {
		t.Errorf("second init error does not name the dir: %s", errOut)
	}
	dirstate.Unchanged(t, before, dirstate.Take(t, dir))
	// Main itself returns the code rather than exiting.
	if code := Main([]string{"init", "--data-dir", dir}); code == 0 {
		t.Error("Main init on an initialised dir returned 0")
	}
	dirstate.Unchanged(t, before, dirstate.Take(t, dir))
}

func TestMainBadFlags(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--data-dir", dir, "--listen", "nope"}, "--listen"},
		{[]string{"run", "--data-dir", dir, "--http", "127.0.0.1:70000"}, "--http"},
		{[]string{"run", "--data-dir", dir, "--replicas", "2"}, "--replicas"},
		{[]string{"run", "--data-dir", dir, "--domain", "a.b"}, "--domain"},
		{[]string{"init", "--data-dir", dir, "--domain", "a.b"}, "--domain"},
		{[]string{"run", "--data-dir", dir, "--facts-history", "0"}, "--facts-history"},
		{[]string{"run", "--data-dir", dir, "--facts-retention", "forever"}, "--facts-retention"},
		{[]string{"run", "--data-dir", dir, "--log-level", "loud"}, "loud"},
		{[]string{"run", "--data-dir", dir, "--log-format", "xml"}, "xml"},
		{[]string{"run", "--data-dir", dir, "--no-such-flag"}, "--no-such-flag"},
		{[]string{"frobnicate"}, "frobnicate"},
		{[]string{"--config", filepath.Join(dir, "missing.json"), "version"}, "missing.json"},
	} {
		code, _, errOut := runMain(tc.args...)
		if code == 0 {
			t.Errorf("%q: exit 0", tc.args)
			continue
		}
		if !strings.Contains(errOut, tc.want) {
			t.Errorf("%q: error output does not mention %s:\n%s", tc.args, tc.want, errOut)
		}
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Fatalf("%q created %s", tc.args, dir)
		}
	}
	if code := Main([]string{"run", "--data-dir", dir, "--replicas", "2"}); code == 0 {
		t.Error("Main with --replicas 2 returned 0")
	}
}

func TestMainBusyPort(t *testing.T) {
	dir, _ := initDir(t)
	busy := occupy(t)
	before := dirstate.Take(t, dir)
	code, _, errOut := runMain("run", "--data-dir", dir, "--listen", busy, "--http", "")
	if code == 0 {
		t.Fatal("run on a busy port succeeded")
	}
	if !strings.Contains(errOut, "--listen") || !strings.Contains(errOut, busy) {
		t.Errorf("error does not name --listen %s: %s", busy, errOut)
	}
	dirstate.Unchanged(t, before, dirstate.Take(t, dir))
}

func TestMainHelpAndVersion(t *testing.T) {
	code, out, _ := runMain("--help")
	if code != 0 || !strings.Contains(out, "fleet-coordinator") {
		t.Errorf("--help: exit %d, output %q", code, out)
	}
	code, out, _ = runMain("version")
	if code != 0 || strings.TrimSpace(out) != Version {
		t.Errorf("version: exit %d, output %q", code, out)
	}
	// A config file sets flags by name.
	dir := filepath.Join(t.TempDir(), "data")
	cfgFile := filepath.Join(t.TempDir(), "fleet.json")
	if err := os.WriteFile(cfgFile, []byte(`{"data-dir": "`+dir+`", "domain": "a.b"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, errOut := runMain("--config", cfgFile, "init")
	if code == 0 || !strings.Contains(errOut, "--domain") {
		t.Errorf("config file domain a.b: exit %d, %s", code, errOut)
	}
	_ = subjects.Domain
}

// init takes the data dir like run does: while another process holds it,
// init refuses and writes nothing.
func TestInitRefusesBusyDataDir(t *testing.T) {
	dir := t.TempDir()
	l, err := dirlock.Acquire(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	before := dirstate.Take(t, dir)
	_, err = Init(testConfig(dir))
	wantErr(t, err, "is in use by pid", "--data-dir")
	dirstate.Unchanged(t, before, dirstate.Take(t, dir))
	if _, err := Start(context.Background(), testConfig(dir), testLogger(t)); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("Start on a busy dir: %v", err)
	}
	dirstate.Unchanged(t, before, dirstate.Take(t, dir))
}
