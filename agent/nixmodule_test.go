package agent

// The agent's config file has one source of truth: `fleet-agent run`'s
// flags (read by kong) and FileConfig (read by LoadFileConfig). The NixOS
// module writes that file through nixos-modules/agent-config.nix, a pure
// Nix function; these tests evaluate it with real nix-instantiate and check
// what it writes against the agent's own parsers, so a renamed flag, a
// renamed json tag or a module option that reaches no setting fails here.
//
// nixos-modules/agent-config.example.json is generated, not hand-kept:
//
//	go test ./agent/ -run NixModule -update

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/alecthomas/kong"

	"fleet/broker"
	"fleet/cliconfig"
)

var updateNixFixture = flag.Bool("update", false, "rewrite nixos-modules/agent-config.example.json from nixos-modules/agent-config.nix")

const (
	nixModulesDir     = "../nixos-modules"
	agentConfigNix    = nixModulesDir + "/agent-config.nix"
	agentConfigExNix  = nixModulesDir + "/tests/agent-config-example.nix"
	agentConfigExJSON = nixModulesDir + "/agent-config.example.json"
	agentModuleNix    = nixModulesDir + "/agent.nix"
)

// notInModule are flags of `fleet-agent run` (and of fleet-agent itself)
// that services.fleet-agent deliberately does not expose as options.
var notInModule = map[string]string{
	"help":         "kong's own",
	"config":       "the module passes the generated file itself with --config",
	"enroll-token": "a token in the config would land in the world-readable Nix store; enrollmentTokenFile is the option",
}

// nixEval evaluates a Nix file or expression to JSON with nix-instantiate.
// CI installs Debian's nix-bin; a missing nix-instantiate is a failure, not
// a skip, or the module would drift from the agent unnoticed.
func nixEval(t *testing.T, args ...string) []byte {
	t.Helper()
	bin, err := exec.LookPath("nix-instantiate")
	if err != nil {
		if _, serr := os.Stat("/usr/bin/nix-instantiate"); serr != nil {
			t.Fatalf("nix-instantiate not found (install Debian's nix-bin: bash scripts/test-deps): %v", err)
		}
		bin = "/usr/bin/nix-instantiate"
	}
	cmd := exec.Command(bin, append([]string{"--eval", "--strict", "--json"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("nix-instantiate %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return out
}

func nixEvalInto(t *testing.T, v any, args ...string) {
	t.Helper()
	out := nixEval(t, args...)
	if err := json.Unmarshal(out, v); err != nil {
		t.Fatalf("nix-instantiate %s: output is not the expected JSON: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// canonicalJSON re-encodes b with sorted keys and indentation.
func canonicalJSON(t *testing.T, b []byte) []byte {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, b)
	}
	out, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return append(out, '\n')
}

// agentConfigNixExpr is an expression evaluating body with m bound to
// agent-config.nix.
func agentConfigNixExpr(t *testing.T, body string) []string {
	t.Helper()
	abs, err := filepath.Abs(agentConfigNix)
	if err != nil {
		t.Fatal(err)
	}
	return []string{"--expr", "let m = import " + abs + "; in " + body}
}

// runFlags are the flags kong resolves for `fleet-agent run` (its own and
// fleet-agent's), by name, taken from kong's model.
func runFlags(t *testing.T, parser *kong.Kong) map[string]*kong.Flag {
	t.Helper()
	var run *kong.Node
	for _, n := range parser.Model.Leaves(false) {
		if n.Name == "run" {
			run = n
		}
	}
	if run == nil {
		t.Fatal("fleet-agent has no run command")
	}
	flags := map[string]*kong.Flag{}
	for _, group := range run.AllFlags(false) {
		for _, f := range group {
			flags[f.Name] = f
		}
	}
	return flags
}

// jsonTags are the json keys of a struct type.
func jsonTags(typ reflect.Type) map[string]bool {
	tags := map[string]bool{}
	for i := range typ.NumField() {
		name, _, _ := strings.Cut(typ.Field(i).Tag.Get("json"), ",")
		if name != "" && name != "-" {
			tags[name] = true
		}
	}
	return tags
}

// kongKey is the config key of a flag: its name as on the command line
// (package cliconfig). agent-config.nix spells its flag keys the same way.
func kongKey(flag string) string { return flag }

func newAgentParser(t *testing.T, cli *CLI, configPath string) *kong.Kong {
	t.Helper()
	parser, err := kong.New(cli, kong.Name("fleet-agent"), kong.Configuration(cliconfig.Loader("health-checks", "health-deadline"), configPath), kong.Exit(func(int) { t.Fatal("kong tried to exit") }))
	if err != nil {
		t.Fatalf("kong.New with config %s: %v", configPath, err)
	}
	return parser
}

// TestNixModuleFixture: the fixture is exactly what agent-config.nix makes
// of the example settings.
func TestNixModuleFixture(t *testing.T) {
	got := canonicalJSON(t, nixEval(t, agentConfigExNix))
	if *updateNixFixture {
		if err := os.WriteFile(agentConfigExJSON, got, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s", agentConfigExJSON)
		return
	}
	want, err := os.ReadFile(agentConfigExJSON)
	if err != nil {
		t.Fatalf("%v (generate it: go test ./agent/ -run NixModule -update)", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s is not what %s evaluates to; regenerate it with `go test ./agent/ -run NixModule -update`\n--- evaluated:\n%s\n--- fixture:\n%s", agentConfigExJSON, agentConfigExNix, got, want)
	}
}

// TestNixModuleFixtureLoads: the agent reads every key of the fixture, both
// through LoadFileConfig and through kong's config resolver for `run`, and
// the values land in the flags.
func TestNixModuleFixtureLoads(t *testing.T) {
	// Evaluate afresh so this test does not depend on the fixture being
	// regenerated; TestNixModuleFixture checks the fixture matches.
	path := filepath.Join(t.TempDir(), "agent.json")
	if err := os.WriteFile(path, nixEval(t, agentConfigExNix), 0o644); err != nil {
		t.Fatal(err)
	}

	fc, err := LoadFileConfig(path)
	if err != nil {
		t.Fatalf("LoadFileConfig: %v", err)
	}
	if len(fc.HealthChecks) != 3 {
		t.Fatalf("LoadFileConfig: %d health checks, want 3: %+v", len(fc.HealthChecks), fc.HealthChecks)
	}
	byName := map[string]HealthCheck{}
	for _, hc := range fc.HealthChecks {
		byName[hc.Name] = hc
	}
	if hc := byName["web"]; hc.Type != CheckHTTP || hc.URL != "http://127.0.0.1:80/healthz" || hc.ExpectStatus != 200 || hc.Retries != 5 || hc.Timeout.Std(0) != 5*time.Second || hc.Interval.Std(0) != 3*time.Second {
		t.Errorf("health check web = %+v", hc)
	}
	if hc := byName["nginx"]; hc.Type != CheckSystemd || !slices.Equal(hc.Units, []string{"nginx.service", "acme-finished-example.org.target"}) {
		t.Errorf("health check nginx = %+v", hc)
	}
	if hc := byName["disk"]; hc.Type != CheckCommand || len(hc.Command) != 3 || hc.Timeout != 0 || hc.Retries != 0 {
		t.Errorf("health check disk = %+v", hc)
	}
	if fc.HealthDeadline.Std(0) != 5*time.Minute {
		t.Errorf("health-deadline = %v, want 5m", time.Duration(fc.HealthDeadline))
	}

	var cli CLI
	parser := newAgentParser(t, &cli, path)
	kctx, err := parser.Parse([]string{"run"})
	if err != nil {
		t.Fatalf("fleet-agent run --config %s: %v", path, err)
	}
	if kctx.Command() != "run" {
		t.Fatalf("parsed command %q, want run", kctx.Command())
	}

	var fixture map[string]any
	b, _ := os.ReadFile(path)
	if err := json.Unmarshal(b, &fixture); err != nil {
		t.Fatal(err)
	}
	flags := runFlags(t, parser)
	byKey := map[string]*kong.Flag{}
	for name, f := range flags {
		byKey[kongKey(name)] = f
	}
	fileTags := jsonTags(reflect.TypeFor[FileConfig]())
	for key, want := range fixture {
		if fileTags[key] {
			continue
		}
		f, ok := byKey[key]
		if !ok {
			t.Errorf("config key %q is neither a flag of `fleet-agent run` nor a FileConfig field", key)
			continue
		}
		checkFlagValue(t, key, f.Target, want)
	}
	// Spot checks on the parsed command itself.
	if !slices.Equal(cli.Run.Server, []string{"nats://fleet.example.org:4222", "nats://leaf.berlin.example.org:4222"}) {
		t.Errorf("run.Server = %v", cli.Run.Server)
	}
	if cli.Run.EnrollTokenFile != "/etc/fleet/enroll-token" || len(cli.Run.ReleaseSigner) != 2 || cli.Run.ReconnectWithin != 2*time.Minute || cli.LogFormat != "json" {
		t.Errorf("run = %+v, log format %q", cli.Run, cli.LogFormat)
	}
}

// checkFlagValue compares a flag's parsed value with its JSON value.
func checkFlagValue(t *testing.T, key string, target reflect.Value, want any) {
	t.Helper()
	got := target.Interface()
	switch w := want.(type) {
	case string:
		if d, ok := got.(time.Duration); ok {
			wd, err := time.ParseDuration(w)
			if err != nil || wd != d {
				t.Errorf("%s: parsed %v from %q", key, d, w)
			}
			return
		}
		if g, ok := got.(string); !ok || g != w {
			t.Errorf("%s: parsed %#v from %q", key, got, w)
		}
	case []any:
		g, ok := got.([]string)
		if !ok || len(g) != len(w) {
			t.Errorf("%s: parsed %#v from %v", key, got, w)
			return
		}
		for i := range w {
			if s, _ := w[i].(string); s != g[i] {
				t.Errorf("%s[%d]: parsed %q from %v", key, i, g[i], w[i])
			}
		}
	case float64:
		if reflect.ValueOf(got).Kind() < reflect.Int || reflect.ValueOf(got).Kind() > reflect.Int64 || float64(reflect.ValueOf(got).Int()) != w {
			t.Errorf("%s: parsed %#v from %v", key, got, w)
		}
	case bool:
		if g, ok := got.(bool); !ok || g != w {
			t.Errorf("%s: parsed %#v from %v", key, got, w)
		}
	default:
		t.Errorf("%s: unexpected JSON value %#v", key, want)
	}
}

// TestNixModuleOptions: every services.fleet-agent option reaches a setting
// the agent reads, and every flag of `run` is an option or is listed in
// notInModule with a reason.
func TestNixModuleOptions(t *testing.T) {
	var meta struct {
		Flags        map[string]string `json:"flags"`
		FileKeys     map[string]string `json:"fileKeys"`
		CheckKeys    map[string]string `json:"checkKeys"`
		SettingNames []string          `json:"settingNames"`
	}
	nixEvalInto(t, &meta, agentConfigNixExpr(t, "{ inherit (m) flags fileKeys checkKeys settingNames; }")...)
	if len(meta.Flags) == 0 || len(meta.FileKeys) == 0 || len(meta.CheckKeys) == 0 {
		t.Fatalf("agent-config.nix exports nothing: %+v", meta)
	}

	var cli CLI
	flags := runFlags(t, newAgentParser(t, &cli, filepath.Join(t.TempDir(), "none.json")))
	fileTags := jsonTags(reflect.TypeFor[FileConfig]())
	checkTags := jsonTags(reflect.TypeFor[HealthCheck]())

	mapped := map[string]bool{}
	for opt, fl := range meta.Flags {
		if _, ok := flags[fl]; !ok {
			t.Errorf("option %s maps to --%s, which `fleet-agent run` does not have", opt, fl)
		}
		mapped[fl] = true
	}
	for name := range flags {
		if !mapped[name] && notInModule[name] == "" {
			t.Errorf("flag --%s of `fleet-agent run` has no services.fleet-agent option; map it in agent-config.nix and agent.nix, or list it in notInModule with a reason", name)
		}
	}
	for opt, key := range meta.FileKeys {
		if !fileTags[key] {
			t.Errorf("option %s maps to %q, which is no json field of FileConfig", opt, key)
		}
		delete(fileTags, key)
	}
	for key := range fileTags {
		t.Errorf("FileConfig field %q has no services.fleet-agent option", key)
	}
	for opt, key := range meta.CheckKeys {
		if !checkTags[key] {
			t.Errorf("health check option %s maps to %q, which is no json field of HealthCheck", opt, key)
		}
		delete(checkTags, key)
	}
	for key := range checkTags {
		t.Errorf("HealthCheck field %q has no healthChecks.<name> option", key)
	}

	// The module's declared options, read from its source: top-level
	// options are declared at 4 spaces of indent in `options.services.
	// fleet-agent = {`, the health check submodule's at 6 (agent.nix keeps
	// nixpkgs-fmt layout).
	src, err := os.ReadFile(agentModuleNix)
	if err != nil {
		t.Fatal(err)
	}
	declared := func(indent int) []string {
		re := regexp.MustCompile(`(?m)^ {` + strconv.Itoa(indent) + `}([A-Za-z]+) = (?:lib\.)?mk(?:Option|EnableOption|PackageOption)\b`)
		var names []string
		for _, m := range re.FindAllStringSubmatch(string(src), -1) {
			names = append(names, m[1])
		}
		sort.Strings(names)
		return names
	}
	// Module-only options: the unit itself, and nix.settings for the cache.
	wantTop := append([]string{"enable", "package", "extraFlags", "substituter", "trustedPublicKeys"}, meta.SettingNames...)
	sort.Strings(wantTop)
	if got := declared(4); !slices.Equal(got, wantTop) {
		t.Errorf("agent.nix declares options %v;\nagent-config.nix maps %v (plus enable, package, extraFlags, substituter, trustedPublicKeys)", got, wantTop)
	}
	var wantCheck []string
	for opt := range meta.CheckKeys {
		wantCheck = append(wantCheck, opt)
	}
	sort.Strings(wantCheck)
	if got := declared(6); !slices.Equal(got, wantCheck) {
		t.Errorf("agent.nix declares health check options %v; agent-config.nix maps %v", got, wantCheck)
	}
}

// TestNixModuleRejectsUnknownSetting: a typo in a setting fails evaluation
// instead of vanishing from the file.
func TestNixModuleRejectsUnknownSetting(t *testing.T) {
	abs, err := filepath.Abs(agentConfigNix)
	if err != nil {
		t.Fatal(err)
	}
	bin, err := exec.LookPath("nix-instantiate")
	if err != nil {
		bin = "/usr/bin/nix-instantiate"
	}
	out, err := exec.Command(bin, "--eval", "--strict", "--json", "--expr",
		"(import "+abs+") { servers = [ \"nats://a:4222\" ]; stateDirectory = \"/x\"; }").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "stateDirectory") {
		t.Fatalf("unknown setting stateDirectory was accepted: err=%v\n%s", err, out)
	}
}

// TestNixModuleCoordinatorConfig: coordinator-config.nix writes keys that
// `fleet-coordinator run` reads, and the values land.
func TestNixModuleCoordinatorConfig(t *testing.T) {
	abs, err := filepath.Abs(nixModulesDir + "/coordinator-config.nix")
	if err != nil {
		t.Fatal(err)
	}
	out := nixEval(t, "--expr", "(import "+abs+`) { dataDir = "/var/lib/fc"; domain = "hub"; listen = "0.0.0.0:4333"; http = ""; leafnodeListen = "0.0.0.0:7422"; serverName = "fc-1"; clusterName = "hq"; clusterListen = "0.0.0.0:6222"; routes = [ "nats-route://fc-2:6222" "nats-route://fc-3:6222" ]; replicas = 3; factsRetention = "24h"; factsHistory = 10; eventsRetention = "48h"; logLevel = "debug"; logFormat = "json"; }`)
	path := filepath.Join(t.TempDir(), "coordinator.json")
	if err := os.WriteFile(path, out, 0o644); err != nil {
		t.Fatal(err)
	}
	var cli broker.CLI
	parser, err := kong.New(&cli, kong.Configuration(cliconfig.Loader(), path), kong.Exit(func(int) { t.Fatal("kong tried to exit") }))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := parser.Parse([]string{"run"}); err != nil {
		t.Fatalf("fleet-coordinator run --config: %v\n%s", err, out)
	}
	r := cli.Run
	if r.DataDir != "/var/lib/fc" || r.Domain != "hub" || r.Listen != "0.0.0.0:4333" || r.HTTP != "" || r.LeafnodeListen != "0.0.0.0:7422" ||
		r.ServerName != "fc-1" || r.ClusterName != "hq" || r.ClusterListen != "0.0.0.0:6222" ||
		strings.Join(r.Routes, " ") != "nats-route://fc-2:6222 nats-route://fc-3:6222" || r.Replicas != 3 || r.FactsRetention != 24*time.Hour || r.FactsHistory != 10 || r.EventsRetention != 48*time.Hour ||
		cli.LogLevel != "debug" || cli.LogFormat != "json" {
		t.Errorf("parsed %+v (log %q %q) from %s", r, cli.LogLevel, cli.LogFormat, out)
	}
}
