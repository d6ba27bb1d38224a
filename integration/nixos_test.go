package integration

// The NixOS modules (nixos-modules/*.nix) evaluated against the real nixpkgs
// module system and NixOS's systemd code, through ../shared/nixos-lite (see
// its README): the generated units and files are checked against what the
// binaries accept (the agent's and the coordinator's config loaders, the
// real nats-server -t), and every assertion, warning and option type error
// is triggered by the option it names. A missing nix-instantiate or
// nixos-lite is a failure, not a skip.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/alecthomas/kong"
	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"

	"fleet/agent"
	"fleet/broker"
	"fleet/cliconfig"
)

// nixosLiteDir is ../shared/nixos-lite beside the repository root (the
// repository root is the parent of this package's directory).
func nixosLiteDir(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(filepath.Dir(root), "shared", "nixos-lite")
	if _, err := os.Stat(filepath.Join(dir, "eval.nix")); err != nil {
		t.Fatalf("nixos-lite not found beside the repository (%s): %v", dir, err)
	}
	return dir
}

func modulePath(t *testing.T, name string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", "nixos-modules", name))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// nixPath is a Nix path expression for an absolute path.
func nixPath(p string) string { return fmt.Sprintf("(/. + %q)", p) }

// nixosReport is what nixosExpr returns for one evaluation.
type nixosReport struct {
	Failed   []string          `json:"failed"`
	Warnings []string          `json:"warnings"`
	Units    map[string]string `json:"units"`
	Ports    []int             `json:"ports"`
	Users    map[string]struct {
		IsSystemUser bool   `json:"isSystemUser"`
		Group        string `json:"group"`
		Home         string `json:"home"`
	} `json:"users"`
	Groups   []string       `json:"groups"`
	Tmpfiles []string       `json:"tmpfiles"`
	Nix      map[string]any `json:"nix"`
}

// evalNixOS evaluates module (a file of nixos-modules) with the given
// configuration (a Nix attribute set, with pkgs and lib in scope) through
// nixos-lite and returns the report, or the evaluation's error output.
func evalNixOS(t *testing.T, module string, configs ...string) (*nixosReport, string, error) {
	t.Helper()
	lite := nixosLiteDir(t)
	var mods strings.Builder
	for _, c := range configs {
		fmt.Fprintf(&mods, " ({ pkgs, lib, ... }: %s)", c)
	}
	expr := fmt.Sprintf(`
let
  lite = %s;
  lib = import (lite + "/lib");
  r = import (lite + "/eval.nix") {
    modules = [ %s%s ];
  };
  c = r.config;
  fleet = lib.filterAttrs (n: _: lib.hasPrefix "fleet" n);
in {
  failed = r.failedAssertions;
  warnings = r.warnings;
  units = lib.mapAttrs (_: u: u.text) (fleet c.systemd.units);
  ports = c.networking.firewall.allowedTCPPorts;
  users = lib.mapAttrs (_: u: { inherit (u) isSystemUser group home; }) (fleet c.users.users);
  groups = builtins.attrNames (fleet c.users.groups);
  tmpfiles = c.systemd.tmpfiles.rules;
  nix = { extra-substituters = c.nix.settings.extra-substituters or null; extra-trusted-public-keys = c.nix.settings.extra-trusted-public-keys or null; };
}`, nixPath(lite), nixPath(modulePath(t, module)), mods.String())
	bin, err := exec.LookPath("nix-instantiate")
	if err != nil {
		t.Fatalf("nix-instantiate not found (install Debian's nix-bin: bash scripts/test-deps): %v", err)
	}
	cmd := exec.Command(bin, "--eval", "--read-write-mode", "--strict", "--json", "--expr", expr)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, stderr.String(), err
	}
	var r nixosReport
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("evaluation output is not the report: %v\n%s", err, out)
	}
	return &r, stderr.String(), nil
}

// mustEvalNixOS evaluates a configuration that must hold: no failed
// assertion, no evaluation error.
func mustEvalNixOS(t *testing.T, module, config string) *nixosReport {
	t.Helper()
	r, stderr, err := evalNixOS(t, module, config)
	if err != nil {
		t.Fatalf("evaluating %s: %v\n%s", module, err, stderr)
	}
	if len(r.Failed) > 0 {
		t.Fatalf("evaluating %s: failed assertions %q", module, r.Failed)
	}
	return r
}

// unit is a parsed unit file: section -> key -> values in order.
type unit map[string]map[string][]string

func parseUnit(t *testing.T, text string) unit {
	t.Helper()
	u := unit{}
	section := ""
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.Trim(line, "[]")
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("unit line %q", line)
			}
			u[section][k] = append(u[section][k], v)
		}
	}
	return u
}

// get is the last value of key in section ("" when absent).
func (u unit) get(section, key string) string {
	vs := u[section][key]
	if len(vs) == 0 {
		return ""
	}
	return vs[len(vs)-1]
}

// execArgs splits an Exec line as NixOS writes it: each argument quoted.
func execArgs(t *testing.T, line string) []string {
	t.Helper()
	var args []string
	for _, m := range regexp.MustCompile(`"((?:[^"\\]|\\.)*)"`).FindAllStringSubmatch(line, -1) {
		args = append(args, m[1])
	}
	if len(args) == 0 {
		t.Fatalf("Exec line %q has no quoted arguments", line)
	}
	return args
}

// argAfter is the argument following flag in args.
func argAfter(t *testing.T, args []string, flag string) string {
	t.Helper()
	i := slices.Index(args, flag)
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("%q not followed by a value in %q", flag, args)
	}
	return args[i+1]
}

const fakeFleetPackage = `pkgs.pkg "nixos-fleet" { }`

// TestNixOSAgentModule: the agent unit runs as root, survives the switch it
// makes, waits for the network, finds nix and systemctl, gets no mount
// namespace, escapes its arguments for systemd, and its config file is read
// by fleet-agent's own loaders.
func TestNixOSAgentModule(t *testing.T) {
	r := mustEvalNixOS(t, "agent.nix", `{
    services.fleet-agent = {
      enable = true;
      package = `+fakeFleetPackage+`;
      servers = [ "nats://fleet.example.org:4222" "nats://leaf.berlin.lan:4222" ];
      enrollmentTokenFile = "/etc/fleet/enroll-token";
      releaseSigners = [ "UAOWNER" "UACI" ];
      healthChecks = {
        sshd = { type = "systemd"; units = [ "sshd.service" ]; };
        web = { type = "http"; url = "http://127.0.0.1/healthz"; retries = 5; timeout = "5s"; };
        disk = { type = "command"; command = [ "/run/current-system/sw/bin/test" "-w" "/var" ]; };
      };
      healthDeadline = "5m";
      reconnectWithin = "90s";
      recheck = "10m";
      approvalPoll = "20s";
      payloadDir = "/run/fleet-test/payloads";
      recoveryKeys = { nvme0n1p2 = "/var/lib/fleet-agent/recovery-nvme0n1p2"; sda1 = "/run/agenix/luks recovery sda1"; };
      escrowKey = "XDMN333ISMBVAKFHWQHHAUJ4G5ZOQZVG4SZLC2C25ENRXUOCPTCRIH7Q";
      substituter = "https://cache.example.org";
      trustedPublicKeys = [ "cache-1:AAAA" ];
      extraFlags = [ "--hostname=%H-100%" "$HOME" ];
    };
  }`)
	if len(r.Warnings) != 0 {
		t.Errorf("warnings %q", r.Warnings)
	}
	text, ok := r.Units["fleet-agent.service"]
	if !ok {
		t.Fatalf("no fleet-agent.service among %v", r.Units)
	}
	u := parseUnit(t, text)
	if got := u.get("Service", "User"); got != "root" {
		t.Errorf("User=%q, want root", got)
	}
	if u.get("Unit", "X-RestartIfChanged") != "false" || u.get("Unit", "X-StopIfChanged") != "false" {
		if u.get("Service", "X-RestartIfChanged") != "false" || u.get("Service", "X-StopIfChanged") != "false" {
			t.Errorf("restartIfChanged/stopIfChanged not false: a switch would kill the agent running it\n%s", text)
		}
	}
	for _, k := range []string{"Wants", "After"} {
		if !strings.Contains(u.get("Unit", k), "network-online.target") {
			t.Errorf("%s=%q lacks network-online.target", k, u.get("Unit", k))
		}
	}
	env := strings.Join(u["Service"]["Environment"], " ")
	m := regexp.MustCompile(`"PATH=([^"]*)"`).FindStringSubmatch(env)
	if m == nil {
		t.Fatalf("no PATH in Environment=%q", env)
	}
	path := strings.Split(m[1], ":")
	for _, want := range []string{"-nix/bin", "-systemd/bin", "/run/current-system/sw/bin"} {
		if !slices.ContainsFunc(path, func(p string) bool { return strings.HasSuffix(p, want) }) {
			t.Errorf("PATH %q lacks *%s", m[1], want)
		}
	}
	// Any of these gives the unit its own mount namespace (or blocks what
	// activation does): switch-to-configuration's mounts would not reach
	// the host.
	for _, k := range []string{"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateUsers",
		"ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname",
		"ProtectProc", "ProcSubset", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths",
		"BindReadOnlyPaths", "RootDirectory", "RootImage", "MountFlags", "NoNewPrivileges", "RestrictSUIDSGID", "SystemCallFilter",
		"RestrictNamespaces", "CapabilityBoundingSet", "DynamicUser"} {
		if v, ok := u["Service"][k]; ok {
			t.Errorf("agent unit sets %s=%q, which breaks activation", k, v)
		}
	}
	if u.get("Service", "StateDirectory") != "fleet-agent" || u.get("Service", "StateDirectoryMode") != "0700" {
		t.Errorf("StateDirectory=%q mode %q", u.get("Service", "StateDirectory"), u.get("Service", "StateDirectoryMode"))
	}
	// The payload dir is made at boot and kept across restarts of the
	// agent: a tmpfiles "d" line, no RuntimeDirectory (removed when the
	// unit stops).
	if !slices.Contains(r.Tmpfiles, "d /run/fleet-test/payloads 0755 root root - -") {
		t.Errorf("tmpfiles %q lack the payload dir", r.Tmpfiles)
	}
	if v, ok := u["Service"]["RuntimeDirectory"]; ok {
		t.Errorf("agent unit sets RuntimeDirectory=%q: payloads would vanish whenever the agent restarts", v)
	}

	// ExecStart: systemd's own specifiers and variables are escaped, so the
	// agent gets the arguments as written in extraFlags.
	execStart := u.get("Service", "ExecStart")
	args := execArgs(t, execStart)
	if !strings.HasSuffix(args[0], "-nixos-fleet/bin/fleet-agent") || args[1] != "run" {
		t.Errorf("ExecStart=%s", execStart)
	}
	if !slices.Contains(args, "--hostname=%%H-100%%") || !slices.Contains(args, "$$HOME") {
		t.Errorf("ExecStart=%s: %% and $ of extraFlags are not escaped for systemd", execStart)
	}

	if !slices.Equal(toStrings(r.Nix["extra-substituters"]), []string{"https://cache.example.org"}) ||
		!slices.Equal(toStrings(r.Nix["extra-trusted-public-keys"]), []string{"cache-1:AAAA"}) {
		t.Errorf("nix.settings = %v", r.Nix)
	}

	// The config file, read by the agent's loaders.
	configPath := argAfter(t, args, "--config")
	fc, err := agent.LoadFileConfig(configPath)
	if err != nil {
		t.Fatalf("LoadFileConfig(%s): %v", configPath, err)
	}
	names := map[string]agent.HealthCheck{}
	for _, hc := range fc.HealthChecks {
		names[hc.Name] = hc
	}
	if len(names) != 3 || names["sshd"].Type != agent.CheckSystemd || names["web"].Retries != 5 || names["web"].Timeout.Std(0) != 5*time.Second ||
		names["disk"].Type != agent.CheckCommand || fc.HealthDeadline.Std(0) != 5*time.Minute {
		t.Errorf("file config = %+v", fc)
	}
	var cli agent.CLI
	parser, err := kong.New(&cli, kong.Name("fleet-agent"), kong.Configuration(cliconfig.Loader("health-checks", "health-deadline"), configPath),
		kong.Exit(func(int) { t.Fatal("kong tried to exit") }))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := parser.Parse([]string{"run"}); err != nil {
		b, _ := os.ReadFile(configPath)
		t.Fatalf("fleet-agent run --config %s: %v\n%s", configPath, err, b)
	}
	run := cli.Run
	if !slices.Equal(run.Server, []string{"nats://fleet.example.org:4222", "nats://leaf.berlin.lan:4222"}) ||
		run.EnrollTokenFile != "/etc/fleet/enroll-token" || !slices.Equal(run.ReleaseSigner, []string{"UAOWNER", "UACI"}) ||
		run.ReconnectWithin != 90*time.Second || run.Recheck != 10*time.Minute || run.ApprovalPoll != 20*time.Second ||
		run.StateDir != "/var/lib/fleet-agent" || cli.LogFormat != "json" {
		t.Errorf("parsed run = %+v (log format %q)", run, cli.LogFormat)
	}
	wantKeys := map[string]string{"nvme0n1p2": "/var/lib/fleet-agent/recovery-nvme0n1p2", "sda1": "/run/agenix/luks recovery sda1"}
	if run.PayloadDir != "/run/fleet-test/payloads" || !maps.Equal(run.RecoveryKey, wantKeys) ||
		run.EscrowKey != "XDMN333ISMBVAKFHWQHHAUJ4G5ZOQZVG4SZLC2C25ENRXUOCPTCRIH7Q" {
		b, _ := os.ReadFile(configPath)
		t.Errorf("parsed payload dir %q, recovery keys %q, escrow key %q from\n%s", run.PayloadDir, run.RecoveryKey, run.EscrowKey, b)
	}
}

func toStrings(v any) []string {
	l, _ := v.([]any)
	var s []string
	for _, x := range l {
		str, _ := x.(string)
		s = append(s, str)
	}
	return s
}

// TestNixOSCoordinatorModule: the coordinator runs as its own user in its
// StateDirectory, hardened, opens ports only when asked, and its config
// file is read by fleet-coordinator's own parser.
func TestNixOSCoordinatorModule(t *testing.T) {
	const base = `
      enable = true;
      package = ` + fakeFleetPackage + `;
      leafnodeListen = "0.0.0.0:7422";
      http = "127.0.0.1:9180";
      serverName = "fleet-1";
      clusterListen = "0.0.0.0:6222";
      routes = [ "nats-route://fleet-2:6222" "nats-route://fleet-3:6222" ];
      extraFlags = [ "--log-level=debug%" ];`
	r := mustEvalNixOS(t, "coordinator.nix", `{ services.fleet-coordinator = {`+base+` }; }`)
	if len(r.Ports) != 0 {
		t.Errorf("firewall ports %v without openFirewall", r.Ports)
	}
	u := parseUnit(t, r.Units["fleet-coordinator.service"])
	want := map[string]string{
		"User": "fleet-coordinator", "Group": "fleet-coordinator", "StateDirectory": "fleet-coordinator", "StateDirectoryMode": "0700",
		"WorkingDirectory": "/var/lib/fleet-coordinator", "ProtectSystem": "strict", "ProtectHome": "true", "PrivateTmp": "true",
		"NoNewPrivileges": "true", "PrivateUsers": "true", "UMask": "0077", "RestrictSUIDSGID": "true", "MemoryDenyWriteExecute": "true",
	}
	for k, v := range want {
		if got := u.get("Service", k); got != v {
			t.Errorf("coordinator unit %s=%q, want %q", k, got, v)
		}
	}
	if got := strings.Join(u["Service"]["SystemCallFilter"], " "); !strings.Contains(got, "@system-service") || !strings.Contains(got, "~@privileged") {
		t.Errorf("SystemCallFilter=%q", got)
	}
	if usr, ok := r.Users["fleet-coordinator"]; !ok || !usr.IsSystemUser || usr.Group != "fleet-coordinator" || !slices.Contains(r.Groups, "fleet-coordinator") {
		t.Errorf("users %+v groups %v", r.Users, r.Groups)
	}
	args := execArgs(t, u.get("Service", "ExecStart"))
	if !strings.HasSuffix(args[0], "/bin/fleet-coordinator") || args[len(args)-1] != "--log-level=debug%%" {
		t.Errorf("ExecStart=%q", args)
	}
	configPath := argAfter(t, args, "--config")
	var cli broker.CLI
	parser, err := kong.New(&cli, kong.Configuration(cliconfig.Loader(), configPath), kong.Exit(func(int) { t.Fatal("kong tried to exit") }))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := parser.Parse([]string{"run"}); err != nil {
		t.Fatalf("fleet-coordinator run --config %s: %v", configPath, err)
	}
	if c := cli.Run; c.DataDir != "/var/lib/fleet-coordinator" || c.Listen != "0.0.0.0:4222" || c.LeafnodeListen != "0.0.0.0:7422" ||
		c.HTTP != "127.0.0.1:9180" || c.ServerName != "fleet-1" || c.ClusterListen != "0.0.0.0:6222" || len(c.Routes) != 2 {
		t.Errorf("parsed run = %+v", c)
	}

	r = mustEvalNixOS(t, "coordinator.nix", `{ services.fleet-coordinator = {`+base+` openFirewall = true; listen = "[::]:4333"; }; }`)
	if slices.Sort(r.Ports); !slices.Equal(r.Ports, []int{4333, 6222, 7422}) {
		t.Errorf("openFirewall: ports %v, want 4333 6222 7422 (listen, cluster, leaf; not http)", r.Ports)
	}
}

// TestNixOSLeafModule: the generated nats.conf (the static part and what
// the unit's ExecStartPre adds) passes the real `nats-server -t`.
func TestNixOSLeafModule(t *testing.T) {
	dir := t.TempDir()
	opKP, _ := nkeys.CreateOperator()
	sysKP, _ := nkeys.CreateAccount()
	fleetKP, _ := nkeys.CreateAccount()
	userKP, _ := nkeys.CreateUser()
	opPub, _ := opKP.PublicKey()
	sysPub, _ := sysKP.PublicKey()
	fleetPub, _ := fleetKP.PublicKey()
	userPub, _ := userKP.PublicKey()
	oc := jwt.NewOperatorClaims(opPub)
	oc.SystemAccount = sysPub
	opJWT, err := oc.Encode(opKP)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	opFile := write("operator.jwt", opJWT)
	for _, pub := range []string{sysPub, fleetPub} {
		ac := jwt.NewAccountClaims(pub)
		s, err := ac.Encode(opKP)
		if err != nil {
			t.Fatal(err)
		}
		write("jwt/"+pub+".jwt", s+"\n")
	}
	uc := jwt.NewUserClaims(userPub)
	uc.IssuerAccount = ""
	userJWT, err := uc.Encode(fleetKP)
	if err != nil {
		t.Fatal(err)
	}
	seed, _ := userKP.Seed()
	creds, err := jwt.FormatUserConfig(userJWT, seed)
	if err != nil {
		t.Fatal(err)
	}
	credsFile := write("leaf.creds", string(creds))

	r := mustEvalNixOS(t, "leaf.nix", fmt.Sprintf(`{
    services.fleet-leaf = {
      enable = true;
      hubUrls = [ "nats-leaf://hub.example.org:7422" ];
      credsFile = %q;
      account = %q;
      operatorJwtFile = %q;
      accountJwtDir = %q;
      serverName = "leaf-berlin";
      monitorListen = "127.0.0.1:8222";
      openFirewall = true;
    };
  }`, credsFile, fleetPub, opFile, filepath.Join(dir, "jwt")))
	if !slices.Equal(r.Ports, []int{4222}) {
		t.Errorf("ports %v, want [4222]", r.Ports)
	}
	// No systemCredentialsFile: the memory resolver alone, and a warning
	// that revocations reach the site only at a restart (the live mode is
	// TestNixOSLeafModuleLiveRevocation).
	if len(r.Warnings) != 1 || !strings.Contains(r.Warnings[0], "reach the site only when accountJwtDir is refreshed and fleet-leaf restarted") {
		t.Errorf("warnings %q, want the one about revocations without systemCredentialsFile", r.Warnings)
	}
	u := parseUnit(t, r.Units["fleet-leaf.service"])
	if u.get("Service", "User") != "fleet-leaf" || u.get("Service", "ProtectSystem") != "strict" || u.get("Service", "RuntimeDirectory") != "fleet-leaf" {
		t.Errorf("leaf unit:\n%s", r.Units["fleet-leaf.service"])
	}
	if got := u.get("Service", "LoadCredential"); got != "leaf.creds:"+credsFile {
		t.Errorf("LoadCredential=%q", got)
	}
	args := execArgs(t, u.get("Service", "ExecStart"))
	if !strings.HasSuffix(args[0], "-nats-server/bin/nats-server") || argAfter(t, args, "-c") != "/run/fleet-leaf/nats.conf" {
		t.Errorf("ExecStart=%q", args)
	}

	// Run the unit's ExecStartPre as systemd would, with /run/fleet-leaf
	// and the credentials directory moved into dir.
	pre := u.get("Service", "ExecStartPre")
	script, err := os.ReadFile(strings.Trim(pre, `"`))
	if err != nil {
		t.Fatalf("ExecStartPre=%s: %v", pre, err)
	}
	conf := filepath.Join(dir, "nats.conf")
	prepare := write("prepare.sh", strings.ReplaceAll(string(script), "/run/fleet-leaf/nats.conf", conf))
	if out, err := exec.Command("bash", prepare).CombinedOutput(); err != nil {
		t.Fatalf("ExecStartPre: %v\n%s", err, out)
	}
	b, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "/run/credentials/fleet-leaf.service/leaf.creds") {
		t.Fatalf("nats.conf does not read the creds from the unit's credentials:\n%s", b)
	}
	text := strings.ReplaceAll(string(b), "/run/credentials/fleet-leaf.service/leaf.creds", credsFile)
	if !strings.Contains(text, "resolver: MEMORY") || strings.Contains(text, "leaf-system.creds") {
		t.Errorf("without systemCredentialsFile: want the memory resolver and one remote:\n%s", text)
	}
	for _, pub := range []string{sysPub, fleetPub} {
		if !strings.Contains(text, pub+": \"ey") {
			t.Errorf("nats.conf does not preload account %s:\n%s", pub, text)
		}
	}
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(natsServerBin, "-t", "-c", conf).CombinedOutput(); err != nil {
		t.Fatalf("nats-server -t -c nats.conf: %v\n%s\n--- nats.conf:\n%s", err, out, text)
	}

	// And the harness sees a broken file: the same config with a bad line
	// is refused by nats-server -t.
	bad := write("bad.conf", text+"\nlisten: {{\n")
	if out, err := exec.Command(natsServerBin, "-t", "-c", bad).CombinedOutput(); err == nil {
		t.Errorf("nats-server -t accepted a broken config:\n%s", out)
	}

	// configFile mode: the file's name reaches nats-server as written.
	r = mustEvalNixOS(t, "leaf.nix", `{ services.fleet-leaf = { enable = true; configFile = "/etc/fleet/leaf-100%.conf"; }; }`)
	u = parseUnit(t, r.Units["fleet-leaf.service"])
	if args := execArgs(t, u.get("Service", "ExecStart")); argAfter(t, args, "-c") != "/etc/fleet/leaf-100%%.conf" {
		t.Errorf("ExecStart=%q: %% not escaped for systemd", args)
	}
	if _, ok := u["Service"]["ExecStartPre"]; ok {
		t.Errorf("configFile mode has an ExecStartPre")
	}
}

// TestNixOSModuleChecks: each assertion and warning fires on the option it
// names, and wrong option values are clear evaluation errors. The cases
// that expect an error are the failing-on-purpose ones: each must fail, and
// with the message given.
func TestNixOSModuleChecks(t *testing.T) {
	const agentBase = `enable = true; package = ` + fakeFleetPackage + `; servers = [ "nats://hub:4222" ]; releaseSigners = [ "UA" ];`
	const coordBase = `enable = true; package = ` + fakeFleetPackage + `;`
	const leafBase = `enable = true; hubUrls = [ "nats-leaf://hub:7422" ]; credsFile = "/etc/fleet/leaf.creds"; account = "AC"; operatorJwtFile = "/etc/fleet/op.jwt"; accountJwtDir = "/etc/fleet/jwt";` +
		` systemCredentialsFile = "/etc/fleet/leaf-system.creds"; systemAccount = "AS";`
	cases := []struct {
		name, module, config string
		override             string // a second module, on top of config
		assertion            string // a failed assertion with this text
		warning              string // a warning with this text
		evalError            []string
		check                func(t *testing.T, r *nixosReport) // more checks on a good evaluation
	}{
		// Baselines: these hold, so each case below fails because of its
		// one changed option.
		{name: "agent ok", module: "agent.nix", config: `{ services.fleet-agent = { ` + agentBase + ` }; }`},
		{name: "coordinator ok", module: "coordinator.nix", config: `{ services.fleet-coordinator = { ` + coordBase + ` }; }`},
		{name: "leaf ok", module: "leaf.nix", config: `{ services.fleet-leaf = { ` + leafBase + ` }; }`},

		{name: "systemd check without units", module: "agent.nix",
			config:    `{ services.fleet-agent = { ` + agentBase + ` }; }`,
			override:  `{ services.fleet-agent = { healthChecks.nginx = { type = "systemd"; }; }; }`,
			assertion: "services.fleet-agent.healthChecks.nginx: a systemd check needs units."},
		{name: "http check without http url", module: "agent.nix",
			config:    `{ services.fleet-agent = { ` + agentBase + ` }; }`,
			override:  `{ services.fleet-agent = { healthChecks.web = { type = "http"; url = "ftp://x/"; }; }; }`,
			assertion: "services.fleet-agent.healthChecks.web: an http check needs an http(s) url."},
		{name: "command check without command", module: "agent.nix",
			config:    `{ services.fleet-agent = { ` + agentBase + ` }; }`,
			override:  `{ services.fleet-agent = { healthChecks.disk = { type = "command"; }; }; }`,
			assertion: "services.fleet-agent.healthChecks.disk: a command check needs a command."},
		{name: "no release signers", module: "agent.nix",
			config:   `{ services.fleet-agent = { ` + agentBase + ` }; }`,
			override: `{ services.fleet-agent = { releaseSigners = lib.mkForce [ ]; }; }`,
			warning:  "services.fleet-agent.releaseSigners is empty"},
		{name: "recovery key disk as a /dev path", module: "agent.nix",
			config:    `{ services.fleet-agent = { ` + agentBase + ` }; }`,
			override:  `{ services.fleet-agent = { recoveryKeys."/dev/nvme0n1p2" = "/var/lib/fleet-agent/recovery"; }; }`,
			assertion: `services.fleet-agent.recoveryKeys: "/dev/nvme0n1p2" is not a disk name`},
		{name: "agent default payload dir", module: "agent.nix",
			config: `{ services.fleet-agent = { ` + agentBase + ` recoveryKeys = { }; }; }`,
			check: func(t *testing.T, r *nixosReport) {
				if !slices.Contains(r.Tmpfiles, "d /run/fleet/payloads 0755 root root - -") {
					t.Errorf("tmpfiles %q lack the default payload dir", r.Tmpfiles)
				}
			}},
		{name: "prometheus without http", module: "coordinator.nix",
			config:    `{ services.fleet-coordinator = { ` + coordBase + ` }; }`,
			override:  `{ services.fleet-coordinator = { http = ""; prometheus.enable = true; }; }`,
			assertion: "services.fleet-coordinator.prometheus.enable needs http"},
		{name: "leaf without hubUrls", module: "leaf.nix",
			config:    `{ services.fleet-leaf = { ` + leafBase + ` }; }`,
			override:  `{ services.fleet-leaf = { hubUrls = lib.mkForce [ ]; }; }`,
			assertion: "services.fleet-leaf: set hubUrls"},
		{name: "leaf without credsFile", module: "leaf.nix",
			config:    `{ services.fleet-leaf = { ` + leafBase + ` }; }`,
			override:  `{ services.fleet-leaf = { credsFile = lib.mkForce null; }; }`,
			assertion: "services.fleet-leaf: set credsFile"},
		{name: "leaf without account", module: "leaf.nix",
			config:    `{ services.fleet-leaf = { ` + leafBase + ` }; }`,
			override:  `{ services.fleet-leaf = { account = lib.mkForce null; }; }`,
			assertion: "services.fleet-leaf: set account"},
		{name: "leaf without operatorJwtFile", module: "leaf.nix",
			config:    `{ services.fleet-leaf = { ` + leafBase + ` }; }`,
			override:  `{ services.fleet-leaf = { operatorJwtFile = lib.mkForce null; }; }`,
			assertion: "services.fleet-leaf: set operatorJwtFile"},
		{name: "leaf without accountJwtDir", module: "leaf.nix",
			config:    `{ services.fleet-leaf = { ` + leafBase + ` }; }`,
			override:  `{ services.fleet-leaf = { accountJwtDir = lib.mkForce null; }; }`,
			assertion: "services.fleet-leaf: set accountJwtDir"},
		{name: "leaf without systemCredentialsFile", module: "leaf.nix",
			config:   `{ services.fleet-leaf = { ` + leafBase + ` }; }`,
			override: `{ services.fleet-leaf = { systemCredentialsFile = lib.mkForce null; }; }`,
			warning:  "services.fleet-leaf: systemCredentialsFile is not set"},
		{name: "leaf systemCredentialsFile without systemAccount", module: "leaf.nix",
			config:    `{ services.fleet-leaf = { ` + leafBase + ` }; }`,
			override:  `{ services.fleet-leaf = { systemAccount = lib.mkForce null; }; }`,
			assertion: "services.fleet-leaf: systemCredentialsFile needs systemAccount"},
		{name: "leaf configFile without systemCredentialsFile", module: "leaf.nix",
			config: `{ services.fleet-leaf = { enable = true; configFile = "/etc/fleet/leaf.conf"; }; }`},

		// Option type errors: the evaluation fails, naming the option.
		{name: "leaf listen without port", module: "leaf.nix",
			config:    `{ services.fleet-leaf = { ` + leafBase + ` }; }`,
			override:  `{ services.fleet-leaf = { listen = "0.0.0.0"; openFirewall = true; }; }`,
			evalError: []string{"services.fleet-leaf.listen", "listen address with a port"}},
		{name: "coordinator listen without port", module: "coordinator.nix",
			config:    `{ services.fleet-coordinator = { ` + coordBase + ` }; }`,
			override:  `{ services.fleet-coordinator = { listen = "0.0.0.0"; openFirewall = true; }; }`,
			evalError: []string{"services.fleet-coordinator.listen", "listen address with a port"}},
		{name: "coordinator leafnodeListen without port", module: "coordinator.nix",
			config:    `{ services.fleet-coordinator = { ` + coordBase + ` }; }`,
			override:  `{ services.fleet-coordinator = { leafnodeListen = "hub.example.org"; }; }`,
			evalError: []string{"services.fleet-coordinator.leafnodeListen", "listen address with a port"}},
		{name: "agent duration not Go", module: "agent.nix",
			config:    `{ services.fleet-agent = { ` + agentBase + ` }; }`,
			override:  `{ services.fleet-agent = { recheck = "15 minutes"; }; }`,
			evalError: []string{"services.fleet-agent.recheck", "is not of type"}},
		{name: "agent log level", module: "agent.nix",
			config:    `{ services.fleet-agent = { ` + agentBase + ` }; }`,
			override:  `{ services.fleet-agent = { logLevel = "verbose"; }; }`,
			evalError: []string{"services.fleet-agent.logLevel", "is not of type"}},
		{name: "recovery key file in the store", module: "agent.nix",
			config:    `{ services.fleet-agent = { ` + agentBase + ` }; }`,
			override:  `{ services.fleet-agent = { recoveryKeys.sda2 = "${builtins.storeDir}/0000-recovery-key"; }; }`,
			evalError: []string{"services.fleet-agent.recoveryKeys.sda2", "absolute path outside the Nix store"}},
		{name: "recovery key file as a Nix path", module: "agent.nix",
			config:    `{ services.fleet-agent = { ` + agentBase + ` }; }`,
			override:  `{ services.fleet-agent = { recoveryKeys.sda2 = /etc/luks-recovery; }; }`,
			evalError: []string{"services.fleet-agent.recoveryKeys.sda2", "absolute path outside the Nix store"}},
		{name: "payload dir relative", module: "agent.nix",
			config:    `{ services.fleet-agent = { ` + agentBase + ` }; }`,
			override:  `{ services.fleet-agent = { payloadDir = "payloads"; }; }`,
			evalError: []string{"services.fleet-agent.payloadDir", "absolute path outside the Nix store"}},
		{name: "escrow key not a curve key", module: "agent.nix",
			config:    `{ services.fleet-agent = { ` + agentBase + ` }; }`,
			override:  `{ services.fleet-agent = { escrowKey = "UAOWNER"; }; }`,
			evalError: []string{"services.fleet-agent.escrowKey", "escrow public key"}},
		{name: "health check of unknown type", module: "agent.nix",
			config:    `{ services.fleet-agent = { ` + agentBase + ` }; }`,
			override:  `{ services.fleet-agent = { healthChecks.x = { type = "ping"; }; }; }`,
			evalError: []string{"services.fleet-agent.healthChecks.x.type", "is not of type"}},

		// No package and no overlay: a clear error, not nixpkgs' FleetDM
		// `fleet` (which has no bin/fleet-agent).
		{name: "agent without package", module: "agent.nix",
			config:    `{ services.fleet-agent = { enable = true; servers = [ "nats://hub:4222" ]; releaseSigners = [ "UA" ]; }; }`,
			evalError: []string{"nixos-fleet cannot be found in pkgs"}},
		{name: "coordinator without package", module: "coordinator.nix",
			config:    `{ services.fleet-coordinator.enable = true; }`,
			evalError: []string{"nixos-fleet cannot be found in pkgs"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			configs := []string{c.config}
			if c.override != "" {
				configs = append(configs, c.override)
			}
			r, stderr, err := evalNixOS(t, c.module, configs...)
			if len(c.evalError) > 0 {
				if err == nil {
					t.Fatalf("evaluation succeeded; want an error naming %q", c.evalError)
				}
				for _, want := range c.evalError {
					if !strings.Contains(stderr, want) {
						t.Errorf("error does not name %q:\n%s", want, stderr)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("evaluation failed: %v\n%s", err, stderr)
			}
			if c.assertion == "" && len(r.Failed) > 0 {
				t.Errorf("failed assertions %q", r.Failed)
			}
			if c.assertion != "" {
				if len(r.Failed) != 1 || !strings.Contains(r.Failed[0], c.assertion) {
					t.Errorf("failed assertions %q; want exactly one containing %q", r.Failed, c.assertion)
				}
			}
			if c.warning == "" && len(r.Warnings) > 0 {
				t.Errorf("warnings %q", r.Warnings)
			}
			if c.warning != "" && !slices.ContainsFunc(r.Warnings, func(w string) bool { return strings.Contains(w, c.warning) }) {
				t.Errorf("warnings %q; want one containing %q", r.Warnings, c.warning)
			}
			if c.check != nil {
				c.check(t, r)
			}
		})
	}
}

// TestNixOSFlake: flake.nix's outputs, evaluated with nixos-lite standing
// in for the nixpkgs input (as `nix flake check --override-input nixpkgs`
// would): the package and overlay are called nixos-fleet and replace no
// nixpkgs package, every nixosModules entry is a module value (not a path,
// which older `nix flake check` refuses), the source filter works without
// lib.fileset, flake.lock pins nixpkgs, and the VM test's nodes evaluate
// (their assertions hold and their fleet units are generated).
func TestNixOSFlake(t *testing.T) {
	lite := nixosLiteDir(t)
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	expr := fmt.Sprintf(`
let
  lite = %s;
  root = %s;
  nixpkgs = (import (lite + "/flake.nix")).outputs { self = nixpkgs; } // { outPath = lite; };
  self = (import (root + "/flake.nix")).outputs { inherit self nixpkgs; } // { outPath = root; };
  sys = "x86_64-linux";
  pkgs = nixpkgs.legacyPackages.${sys};
  pkg = self.packages.${sys}.nixos-fleet;
in {
  modulePaths = builtins.attrNames (pkgs.lib.filterAttrs (_: m: builtins.isPath m || builtins.isString m) self.nixosModules);
  modules = builtins.attrNames self.nixosModules;
  packages = builtins.attrNames self.packages.${sys};
  overlay = builtins.attrNames (self.overlays.default pkgs pkgs);
  pname = pkg.pname;
  src = "${pkg.src}";
  testSrc = "${self.checks.${sys}.go-test.src}";
  vm = self.checks.${sys}.vm-test.report;
}`, nixPath(lite), nixPath(root))
	cmd := exec.Command("nix-instantiate", "--eval", "--read-write-mode", "--strict", "--json", "--expr", expr)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("evaluating flake.nix: %v\n%s", err, stderr.String())
	}
	var f struct {
		ModulePaths []string `json:"modulePaths"`
		Modules     []string `json:"modules"`
		Packages    []string `json:"packages"`
		Overlay     []string `json:"overlay"`
		Pname       string   `json:"pname"`
		Src         string   `json:"src"`
		TestSrc     string   `json:"testSrc"`
		VM          map[string]struct {
			Units map[string]string `json:"units"`
		} `json:"vm"`
	}
	if err := json.Unmarshal(out, &f); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if len(f.ModulePaths) > 0 {
		t.Errorf("nixosModules %v are paths; wrap them as { imports = [ ... ]; }", f.ModulePaths)
	}
	if !slices.Equal(f.Modules, []string{"agent", "coordinator", "default", "leaf"}) {
		t.Errorf("nixosModules = %v", f.Modules)
	}
	if !slices.Equal(f.Packages, []string{"default", "nixos-fleet"}) || !slices.Equal(f.Overlay, []string{"nixos-fleet"}) || f.Pname != "nixos-fleet" {
		t.Errorf("packages %v, overlay %v, pname %q: want only nixos-fleet (pkgs.fleet is nixpkgs' FleetDM)", f.Packages, f.Overlay, f.Pname)
	}
	for _, c := range []struct {
		dir        string
		want, omit []string
	}{
		{f.Src, []string{"go.mod", "go.sum", "cmd/fleet-agent", "agent/cli.go"}, []string{"README.md", "flake.nix", "nixos-modules/agent.nix"}},
		{f.TestSrc, []string{"go.mod", "agent/cli.go", "nixos-modules/agent.nix", "grafana"}, []string{"README.md", "flake.nix"}},
	} {
		for _, p := range c.want {
			if _, err := os.Stat(filepath.Join(c.dir, p)); err != nil {
				t.Errorf("source %s lacks %s", c.dir, p)
			}
		}
		for _, p := range c.omit {
			if _, err := os.Stat(filepath.Join(c.dir, p)); err == nil {
				t.Errorf("source %s has %s", c.dir, p)
			}
		}
	}
	for _, node := range []string{"coordinator", "agent1", "agent2"} {
		units := f.VM[node].Units
		want := "fleet-agent.service"
		if node == "coordinator" {
			want = "fleet-coordinator.service"
		}
		if _, ok := units[want]; !ok {
			t.Errorf("VM test node %s: no %s among %d fleet units", node, want, len(units))
		}
		for name, text := range units {
			if (name == "fleet-agent.service" || name == "fleet-coordinator.service") && !strings.Contains(text, "-nixos-fleet-") {
				t.Errorf("VM test node %s: %s does not run the flake's package:\n%s", node, name, text)
			}
		}
	}

	flake, err := os.ReadFile(filepath.Join(root, "flake.nix"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(flake), "lib.fileset.") {
		t.Errorf("flake.nix uses lib.fileset, which pure evaluation refuses on Nix < 2.14")
	}
	var lock struct {
		Nodes map[string]struct {
			Locked   map[string]any `json:"locked"`
			Original map[string]any `json:"original"`
		} `json:"nodes"`
	}
	b, err := os.ReadFile(filepath.Join(root, "flake.lock"))
	if err != nil {
		t.Fatalf("no flake.lock: %v", err)
	}
	if err := json.Unmarshal(b, &lock); err != nil {
		t.Fatal(err)
	}
	n := lock.Nodes["nixpkgs"]
	if rev, _ := n.Locked["rev"].(string); len(rev) != 40 || n.Locked["narHash"] == nil || n.Original["ref"] == nil {
		t.Errorf("flake.lock does not pin nixpkgs to a revision of a branch: %+v", n)
	}
	if m := regexp.MustCompile(`nixpkgs\.url = "github:NixOS/nixpkgs/([^"]+)"`).FindSubmatch(flake); m == nil || string(m[1]) != n.Original["ref"] {
		t.Errorf("flake.nix's nixpkgs url and flake.lock's original ref (%v) differ", n.Original["ref"])
	}
}
