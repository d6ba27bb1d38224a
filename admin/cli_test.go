package admin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/admin"
	"fleet/agent"
	"fleet/broker"
	"fleet/internal/lockedbuf"
	"fleet/internal/poll"
	"fleet/model"
)

func adminCreds(c *broker.Coordinator) string {
	return filepath.Join(c.Config().DataDir, accounts.AdminCredsFile)
}

// runIO runs fleet-admin without the coordinator flags, with stdin.
func runIO(t *testing.T, ctx context.Context, stdin string, tty bool, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	code := admin.RunIO(ctx, args, admin.IO{Stdin: strings.NewReader(stdin), StdinTTY: tty, Stdout: &out, Stderr: &errb})
	return out.String(), errb.String(), code
}

// enrol enrols a device named host into group and keeps it connected; it
// never applies anything (no agent loop), so a rollout's health timeout
// passes for it.
func enrol(t *testing.T, c *broker.Coordinator, host, group string) string {
	t.Helper()
	out, errs, code := run(t, c, "token", "create", "--group", group)
	if code != 0 {
		t.Fatalf("token create: %s", errs)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cr, err := agent.LoadOrEnroll(ctx, agent.EnrollOptions{Servers: []string{c.ClientURL()}, StateDir: t.TempDir(),
		Token: strings.TrimSpace(out), Hostname: host, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	nc, err := agent.Connect(ctx, cr, agent.ConnOptions{Servers: []string{c.ClientURL()}, Name: host, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return cr.PublicKey()
}

func releaseFor(t *testing.T, c *broker.Coordinator, id string) {
	t.Helper()
	if _, errs, code := run(t, c, "release", "create", "--name", id, "--default", storePath(id)); code != 0 {
		t.Fatalf("release create: %s", errs)
	}
}

// Exit codes a CI job can tell apart: 2 usage, 3 paused, 4 failed or
// aborted, 5 unreachable, 6 not authorised.
func TestExitCodes(t *testing.T) {
	c := start(t)
	enrol(t, c, "web1", "web")
	releaseFor(t, c, "rel-x")

	if _, errs, code := run(t, c, "devices", "ls", "--no-such-flag"); code != admin.ExitUsage || !strings.Contains(errs, "no-such-flag") {
		t.Errorf("unknown flag: %d %s", code, errs)
	}
	// The device never reports: its health timeout passes, the failure
	// is over --max-failures 0 and the rollout pauses.
	out, errs, code := run(t, c, "deploy", "--release", "rel-x", "--group", "web", "--strategy", "all", "--health-timeout", "1s", "--wait")
	if code != admin.ExitPaused || !strings.Contains(errs, "paused") || !strings.Contains(errs, "rollout resume") {
		t.Fatalf("deploy --wait of a pausing rollout: exit %d\n%s\n%s", code, out, errs)
	}
	if !strings.Contains(errs, "to 1 device in batch 1\n") {
		t.Errorf("deploy names its batches as people write them:\n%s", errs)
	}
	// The progress lines add up: succeeded + failed + waiting + queued.
	if !strings.Contains(out, "0/1 succeeded, 1 failed, 0 waiting, 0 queued") {
		t.Errorf("progress:\n%s", out)
	}
	var ros []model.Rollout
	lsOut, _, _ := run(t, c, "--json", "rollout", "ls")
	if err := json.Unmarshal([]byte(lsOut), &ros); err != nil || len(ros) != 1 {
		t.Fatalf("rollout ls: %v %s", err, lsOut)
	}
	id := ros[0].ID
	if _, errs, code := run(t, c, "rollout", "watch", id); code != admin.ExitPaused {
		t.Errorf("watch of a paused rollout: %d %s", code, errs)
	}
	if _, errs, code := run(t, c, "--yes", "rollout", "abort", id); code != 0 {
		t.Fatalf("abort: %s", errs)
	}
	if _, errs, code := run(t, c, "rollout", "watch", id); code != admin.ExitFailed || !strings.Contains(errs, "aborted") {
		t.Errorf("watch of an aborted rollout: %d %s", code, errs)
	}

	// Unreachable: nothing listens.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := ln.Addr().String()
	ln.Close()
	if _, errs, code := runIO(t, context.Background(), "", false, "--server", "nats://"+closed, "--creds", adminCreds(c), "devices", "ls"); code != admin.ExitUnreachable || !strings.Contains(errs, "nothing listens") {
		t.Errorf("closed port: %d %s", code, errs)
	}
	// Not authorised: creds of another fleet.
	other := start(t)
	if _, errs, code := runIO(t, context.Background(), "", false, "--server", c.ClientURL(), "--creds", adminCreds(other), "devices", "ls"); code != admin.ExitDenied || !strings.Contains(errs, "refused the credentials") {
		t.Errorf("foreign creds: %d %s", code, errs)
	}
}

// Connection failures each have their own message, within two seconds: a
// closed port, an HTTP port, refused creds.
func TestConnectionErrors(t *testing.T) {
	c := start(t)
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	defer web.Close()
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := ln.Addr().String()
	ln.Close()
	other := start(t)
	for _, tc := range []struct {
		server, creds, says string
		code                int
	}{
		{"nats://" + closed, adminCreds(c), "nothing listens at " + closed, admin.ExitUnreachable},
		{"nats://" + web.Listener.Addr().String(), adminCreds(c), "does not speak NATS", admin.ExitUnreachable},
		{c.ClientURL(), adminCreds(other), "refused the credentials", admin.ExitDenied},
	} {
		began := time.Now()
		_, errs, code := runIO(t, context.Background(), "", false, "--server", tc.server, "--creds", tc.creds, "status")
		if code != tc.code || !strings.Contains(errs, tc.says) || !strings.Contains(errs, "--server") {
			t.Errorf("%s: exit %d, %s", tc.server, code, errs)
		}
		if took := time.Since(began); took > 2*time.Second {
			t.Errorf("%s: %s to fail", tc.server, took)
		}
	}
}

// Ctrl-C during a wait: the rollout continues, the command says how to
// follow or abort it, and exits 130. A coordinator that goes away during a
// wait is reported within seconds, with exit 5.
func TestWaitInterruptedAndLost(t *testing.T) {
	c := start(t)
	enrol(t, c, "web1", "web")
	releaseFor(t, c, "rel-y")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errb lockedbuf.Buffer
	done := make(chan int, 1)
	go func() {
		done <- admin.RunIO(ctx, []string{"--server", c.ClientURL(), "--creds", adminCreds(c), "deploy", "--release", "rel-y",
			"--group", "web", "--health-timeout", "1h", "--wait"}, admin.IO{Stdout: &out, Stderr: &errb})
	}()
	poll.Until(t, 10*time.Second, "deploy --wait shows progress", func() bool { return strings.Contains(out.String(), "1 waiting") })
	cancel()
	var code int
	select {
	case code = <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("deploy --wait did not stop on interrupt")
	}
	var ros []model.Rollout
	lsOut, _, _ := run(t, c, "--json", "rollout", "ls")
	if err := json.Unmarshal([]byte(lsOut), &ros); err != nil || len(ros) != 1 {
		t.Fatalf("rollout ls: %v %s", err, lsOut)
	}
	id := ros[0].ID
	if code != admin.ExitInterrupted || !strings.Contains(errb.String(), "\nstopped watching: rollout "+id+" continues on the coordinator") ||
		!strings.Contains(errb.String(), "fleet-admin rollout watch "+id) || !strings.Contains(errb.String(), "fleet-admin rollout abort "+id) {
		t.Fatalf("interrupted: exit %d\n%s", code, errb.String())
	}
	if ros[0].State != model.RolloutRunning {
		t.Errorf("the rollout stopped with the watch: %s", ros[0].State)
	}

	// The coordinator goes away mid-watch.
	out, errb = lockedbuf.Buffer{}, lockedbuf.Buffer{}
	go func() {
		done <- admin.RunIO(context.Background(), []string{"--server", c.ClientURL(), "--creds", adminCreds(c), "rollout", "watch", id},
			admin.IO{Stdout: &out, Stderr: &errb})
	}()
	poll.Until(t, 10*time.Second, "rollout watch shows progress", func() bool { return strings.Contains(out.String(), "1 waiting") })
	began := time.Now()
	c.Close()
	select {
	case code = <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("rollout watch did not notice the coordinator was gone")
	}
	if took := time.Since(began); code != admin.ExitUnreachable || took > 10*time.Second ||
		!strings.Contains(errb.String(), "lost the connection to the coordinator") || !strings.Contains(errb.String(), "rollout watch "+id) {
		t.Fatalf("coordinator gone: exit %d after %s\n%s", code, took, errb.String())
	}
}

// NATS contexts: context save writes a natscli context (server, creds,
// the admin's inbox prefix), --context, $NATS_CONTEXT and the selected
// context supply --server and --creds, and a flag or FLEET_* variable
// wins over the context.
func TestNATSContexts(t *testing.T) {
	c := start(t)
	cfg := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", cfg)
	t.Setenv("NATS_CONTEXT", "")
	os.Unsetenv("NATS_CONTEXT")
	bg := context.Background()

	if _, errs, code := runIO(t, bg, "", false, "--context", "nosuch", "devices", "ls"); code != admin.ExitUsage || !strings.Contains(errs, `"nosuch" does not exist`) {
		t.Errorf("missing context: %d %s", code, errs)
	}
	if _, errs, code := runIO(t, bg, "", false, "--server", c.ClientURL(), "--creds", adminCreds(c), "context", "save", "fleet"); code != 0 {
		t.Fatal(errs)
	}
	path := filepath.Join(cfg, "nats", "context", "fleet.json")
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("context file: %v %v", err, fi)
	}
	var saved map[string]any
	b, _ := os.ReadFile(path)
	if err := json.Unmarshal(b, &saved); err != nil {
		t.Fatal(err)
	}
	cr, _ := accounts.ReadCreds(adminCreds(c))
	if saved["url"] != c.ClientURL() || saved["creds"] != adminCreds(c) || saved["inbox_prefix"] != "_INBOX_"+cr.PublicKey() {
		t.Fatalf("saved context %s", b)
	}
	// Saving again needs --force.
	if _, errs, code := runIO(t, bg, "", false, "--server", c.ClientURL(), "--creds", adminCreds(c), "context", "save", "fleet"); code != admin.ExitUsage || !strings.Contains(errs, "--force") {
		t.Errorf("overwrite: %d %s", code, errs)
	}

	if out, errs, code := runIO(t, bg, "", false, "--context", "fleet", "--json", "devices", "ls"); code != 0 || strings.TrimSpace(out) != "[]" {
		t.Fatalf("--context: %d %s %s", code, out, errs)
	}
	t.Setenv("NATS_CONTEXT", "fleet")
	if out, errs, code := runIO(t, bg, "", false, "--json", "devices", "ls"); code != 0 || strings.TrimSpace(out) != "[]" {
		t.Fatalf("$NATS_CONTEXT: %d %s %s", code, out, errs)
	}
	// FLEET_SERVER wins over the context (here: a port nothing listens on).
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := ln.Addr().String()
	ln.Close()
	t.Setenv("FLEET_SERVER", "nats://"+closed)
	if _, errs, code := runIO(t, bg, "", false, "devices", "ls"); code != admin.ExitUnreachable || !strings.Contains(errs, closed) {
		t.Errorf("FLEET_SERVER over the context: %d %s", code, errs)
	}
	// And a flag over FLEET_SERVER.
	if _, errs, code := runIO(t, bg, "", false, "--server", c.ClientURL(), "devices", "ls"); code != 0 {
		t.Errorf("--server over FLEET_SERVER: %d %s", code, errs)
	}
	os.Unsetenv("FLEET_SERVER")
	os.Unsetenv("NATS_CONTEXT")

	// The selected context (nats context select; here context save --select).
	if _, errs, code := runIO(t, bg, "", false, "--server", c.ClientURL(), "--creds", adminCreds(c), "context", "save", "sel", "--select"); code != 0 {
		t.Fatal(errs)
	}
	if b, _ := os.ReadFile(filepath.Join(cfg, "nats", "context.txt")); string(b) != "sel" {
		t.Fatalf("context.txt %q", b)
	}
	out, errs, code := runIO(t, bg, "", false, "context", "show")
	if code != 0 || !strings.Contains(out, "sel") || !strings.Contains(out, c.ClientURL()) {
		t.Fatalf("context show: %d %s %s", code, out, errs)
	}
	if out, errs, code := runIO(t, bg, "", false, "--json", "status"); code != 0 || !strings.Contains(out, `"summary"`) {
		t.Fatalf("selected context: %d %s %s", code, out, errs)
	}
}

// token create --out writes the token alone, mode 0600, atomically; a
// refused request writes nothing, and a path that cannot be written creates
// no token.
func TestTokenOut(t *testing.T) {
	c := start(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "enroll-token")
	// A file that was there, world-readable, is replaced by a 0600 one.
	if err := os.WriteFile(file, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, errs, code := run(t, c, "token", "create", "--group", "lab", "--out", file)
	if code != 0 || !strings.Contains(out, "written to "+file) || strings.Contains(out, model.TokenPrefix+".") {
		t.Fatalf("token create --out: %d %q %s", code, out, errs)
	}
	fi, err := os.Stat(file)
	b, _ := os.ReadFile(file)
	if err != nil || fi.Mode().Perm() != 0o600 || !strings.HasPrefix(string(b), model.TokenPrefix+".") || strings.Count(string(b), "\n") != 1 {
		t.Fatalf("token file: %v %v %q", err, fi, b)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("left behind: %v", entries)
	}
	// Refused by the coordinator: the file is untouched, nothing else left.
	if _, errs, code := run(t, c, "token", "create", "--group", "bad group!", "--out", file); code == 0 || !strings.Contains(errs, "not a valid group") {
		t.Fatalf("bad group: %d %s", code, errs)
	}
	if b2, _ := os.ReadFile(file); string(b2) != string(b) {
		t.Fatal("a refused token create changed the file")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("left behind: %v", entries)
	}
	// A directory that does not exist: no token is created.
	if _, errs, code := run(t, c, "token", "create", "--group", "lab", "--out", filepath.Join(dir, "nosuch", "tok")); code == 0 || !strings.Contains(errs, "no token was created") {
		t.Fatalf("unwritable --out: %d %s", code, errs)
	}
	var toks []map[string]any
	lsOut, _, _ := run(t, c, "--json", "token", "ls")
	if err := json.Unmarshal([]byte(lsOut), &toks); err != nil || len(toks) != 1 || toks[0]["state"] != "valid" {
		t.Fatalf("tokens after: %v %s", err, lsOut)
	}
	if tbl, _, _ := run(t, c, "token", "ls"); !strings.Contains(tbl, "valid") {
		t.Errorf("token ls table: %s", tbl)
	}
}

// Destructive verbs ask y/N on a terminal, --yes or FLEET_YES skips the
// question, and without a terminal they refuse and say to pass --yes.
func TestConfirmation(t *testing.T) {
	c := start(t)
	id := enrol(t, c, "web1", "web")
	enrol(t, c, "web2", "web")
	bg := context.Background()
	flags := []string{"--server", c.ClientURL(), "--creds", adminCreds(c)}

	_, errs, code := runIO(t, bg, "", false, append(flags, "devices", "revoke", "web1")...)
	if code != admin.ExitUsage || !strings.Contains(errs, "--yes") || !strings.Contains(errs, "not a terminal") {
		t.Fatalf("no terminal: %d %s", code, errs)
	}
	_, errs, code = runIO(t, bg, "n\n", true, append(flags, "devices", "revoke", "web1")...)
	if code != admin.ExitError || !strings.Contains(errs, "[y/N]") || !strings.Contains(errs, id) || !strings.Contains(errs, "not confirmed") {
		t.Fatalf("answered no: %d %s", code, errs)
	}
	if out, _, _ := run(t, c, "devices", "show", "web1"); !strings.Contains(out, "active") {
		t.Fatalf("revoked without confirmation:\n%s", out)
	}
	if out, errs, code := runIO(t, bg, "y\n", true, append(flags, "devices", "revoke", "web1")...); code != 0 || !strings.Contains(out, "revoked") {
		t.Fatalf("answered yes: %d %s %s", code, out, errs)
	}
	t.Setenv("FLEET_YES", "1")
	if out, errs, code := runIO(t, bg, "", false, append(flags, "devices", "revoke", "web2")...); code != 0 || !strings.Contains(out, "revoked") {
		t.Fatalf("FLEET_YES: %d %s %s", code, out, errs)
	}
	os.Unsetenv("FLEET_YES")
	if _, errs, code := runIO(t, bg, "", false, append(flags, "admin", "remove", "someone")...); code != admin.ExitUsage || !strings.Contains(errs, "--yes") {
		t.Errorf("admin remove: %d %s", code, errs)
	}
	if _, errs, code := runIO(t, bg, "", false, append(flags, "rollout", "abort", "ro-1")...); code != admin.ExitUsage || !strings.Contains(errs, "--yes") {
		t.Errorf("rollout abort: %d %s", code, errs)
	}
}

// A typo'd group is named as missing, with the groups near it.
func TestGroupTypo(t *testing.T) {
	c := start(t)
	enrol(t, c, "web1", "developers")
	enrol(t, c, "db1", "databases")
	for _, verb := range [][]string{{"devices", "ls"}, {"status"}} {
		_, errs, code := run(t, c, append(verb, "--group", "develpers")...)
		if code != admin.ExitError || !strings.Contains(errs, `group "develpers" does not exist`) || !strings.Contains(errs, "did you mean developers?") {
			t.Errorf("%v: %d %s", verb, code, errs)
		}
	}
	_, errs, _ := run(t, c, "devices", "ls", "--group", "zzz")
	if !strings.Contains(errs, "groups: databases, developers") {
		t.Errorf("far from every group: %s", errs)
	}
	if out, errs, code := run(t, c, "devices", "ls", "--group", "developers"); code != 0 || !strings.Contains(out, "web1") {
		t.Errorf("right group: %d %s %s", code, out, errs)
	}
}

// --version, bare fleet-admin, completion, --since in days and weeks,
// --json of version.
func TestCLIConveniences(t *testing.T) {
	c := start(t)
	bg := context.Background()
	if out, _, code := runIO(t, bg, "", false, "--version"); code != 0 || strings.TrimSpace(out) != admin.Version {
		t.Errorf("--version: %d %q", code, out)
	}
	if out, _, code := runIO(t, bg, "", false, "--json", "version"); code != 0 || !strings.Contains(out, `"version"`) {
		t.Errorf("--json version: %d %q", code, out)
	}
	if out, errs, code := runIO(t, bg, "", false); code != 0 || !strings.Contains(out, "Usage: fleet-admin") || !strings.Contains(out, "rollout") || errs != "" {
		t.Errorf("bare: %d %q %q", code, out, errs)
	}
	if out, _, code := runIO(t, bg, "", false, "--help"); code != 0 || !strings.Contains(out, "5 coordinator unreachable") {
		t.Errorf("--help names the exit codes: %d %q", code, out)
	}
	for _, since := range []string{"1d", "2w", "1w2d", "36h", "0"} {
		if _, errs, code := run(t, c, "audit", "ls", "--since", since); code != 0 {
			t.Errorf("audit ls --since %s: %s", since, errs)
		}
	}
	if _, errs, code := run(t, c, "audit", "ls", "--since", "2x"); code != admin.ExitUsage || !strings.Contains(errs, "1d") {
		t.Errorf("--since 2x: %d %s", code, errs)
	}
	// Audit arguments read 24h, not nanoseconds.
	run(t, c, "token", "create", "--group", "lab", "--ttl", "24h")
	if out, _, _ := run(t, c, "audit", "ls"); !strings.Contains(out, `"ttl":"24h"`) || strings.Contains(out, "86400000000000") {
		t.Errorf("audit durations:\n%s", out)
	}

	for shell, want := range map[string]string{"bash": "complete -o default -o bashdefault -C", "zsh": "bashcompinit", "fish": "COMP_LINE"} {
		if out, errs, code := runIO(t, bg, "", false, "completion", "-c", shell); code != 0 || !strings.Contains(out, want) || !strings.Contains(out, "fleet-admin") {
			t.Errorf("completion %s: %d %q %s", shell, code, out, errs)
		}
	}
	// What the shell runs on TAB: candidates from the kong model.
	t.Setenv("COMP_LINE", "fleet-admin ro")
	out, _, code := runIO(t, bg, "", false, "ro")
	if code != 0 || strings.TrimSpace(out) != "rollout" {
		t.Errorf("complete 'ro': %d %q", code, out)
	}
	t.Setenv("COMP_LINE", "fleet-admin rollout ")
	out, _, _ = runIO(t, bg, "", false)
	for _, sub := range []string{"ls", "show", "watch", "pause", "resume", "abort"} {
		if !strings.Contains(out, sub+"\n") {
			t.Errorf("complete 'rollout ': %q lacks %s", out, sub)
		}
	}
	t.Setenv("COMP_LINE", "fleet-admin deploy --str")
	if out, _, _ = runIO(t, bg, "", false); strings.TrimSpace(out) != "--strategy" {
		t.Errorf("complete 'deploy --str': %q", out)
	}
}
