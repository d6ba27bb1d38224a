package agent

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

func TestHTTPCheck(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ok":
			w.WriteHeader(http.StatusOK)
		case "/flaky":
			// Fails twice, then passes: retries must carry it.
			if calls.Add(1) <= 2 {
				w.WriteHeader(http.StatusServiceUnavailable)
				return
			}
			w.WriteHeader(http.StatusOK)
		case "/teapot":
			w.WriteHeader(http.StatusTeapot)
		case "/slow":
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
		case "/redirect":
			http.Redirect(w, r, "/ok", http.StatusFound)
		}
	}))
	defer srv.Close()
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := "http://" + ln.Addr().String() + "/"
	ln.Close()

	ctx := context.Background()
	fast := func(c HealthChecker, retries int) Retrying {
		return Retrying{HealthChecker: c, Timeout: 300 * time.Millisecond, Retries: retries, Interval: 10 * time.Millisecond}
	}
	for _, tc := range []struct {
		name    string
		check   HTTPCheck
		retries int
		wantErr string
	}{
		{"ok", HTTPCheck{URL: srv.URL + "/ok"}, 0, ""},
		{"flaky", HTTPCheck{URL: srv.URL + "/flaky"}, 3, ""},
		{"expect 418", HTTPCheck{URL: srv.URL + "/teapot", ExpectStatus: 418}, 0, ""},
		{"wrong status", HTTPCheck{URL: srv.URL + "/teapot"}, 1, "status 418, want 200"},
		{"redirect is not followed", HTTPCheck{URL: srv.URL + "/redirect"}, 0, "status 302"},
		{"timeout", HTTPCheck{URL: srv.URL + "/slow"}, 0, "deadline exceeded"},
		{"closed port", HTTPCheck{URL: closed}, 1, "connection refused"},
		{"bad url", HTTPCheck{URL: "http://[::1"}, 0, "request"},
	} {
		tc.check.CheckName = tc.name
		err := fast(tc.check, tc.retries).Run(ctx)
		if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("%s: err %v, want %q", tc.name, err, tc.wantErr)
		}
	}
}

func TestCommandCheck(t *testing.T) {
	ctx := context.Background()
	r := func(argv ...string) Retrying {
		return Retrying{HealthChecker: CommandCheck{CheckName: "c", Argv: argv, Log: zerolog.Nop()}, Timeout: 500 * time.Millisecond, Interval: time.Millisecond}
	}
	if err := r("/bin/true").Run(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r("/bin/false").Run(ctx); err == nil {
		t.Fatal("false passed")
	}
	if err := r("/nonexistent/cmd").Run(ctx); err == nil {
		t.Fatal("missing command passed")
	}
	start := time.Now()
	if err := r("/bin/sleep", "10").Run(ctx); err == nil || time.Since(start) > 5*time.Second {
		t.Fatalf("sleep: err %v after %s, want a timeout", err, time.Since(start))
	}
	var ce *CmdError
	err := r("/bin/sh", "-c", "echo boom >&2; exit 3").Run(ctx)
	if !errors.As(err, &ce) || !strings.Contains(ce.Tail, "boom") {
		t.Fatalf("output tail not kept: %v", err)
	}
}

// fakeSystemctl puts a systemctl first on PATH (the check runs "systemctl"
// from PATH) that answers "is-active -- UNIT" as systemd does: "active" and
// exit 0 for the units in active, "failed" and exit 3 for those in failed,
// "inactive" and exit 3 for any other. Each call is appended to the
// returned log file.
func fakeSystemctl(t *testing.T, active, failed []string) (calls string) {
	t.Helper()
	dir := t.TempDir()
	calls = filepath.Join(dir, "calls")
	script := `#!/bin/sh
echo "$*" >>` + shellQuote(calls) + `
if [ "$#" -ne 3 ] || [ "$1" != is-active ] || [ "$2" != -- ]; then
	echo "unexpected arguments: $*" >&2
	exit 2
fi
case " ` + strings.Join(active, " ") + ` " in *" $3 "*) echo active; exit 0;; esac
case " ` + strings.Join(failed, " ") + ` " in *" $3 "*) echo failed; exit 3;; esac
echo inactive
exit 3
`
	if err := os.WriteFile(filepath.Join(dir, "systemctl"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	return calls
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// readCalls returns the argument lists the fake systemctl was called with.
func readCalls(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimRight(string(b), "\n"), "\n")
}

// The systemd check passes when every unit is active and otherwise names
// the first unit that is not, with the state systemctl reported.
func TestSystemdCheck(t *testing.T) {
	calls := fakeSystemctl(t, []string{"web.service", "db.service"}, []string{"crashed.service"})
	run := func(units ...string) error {
		return Retrying{HealthChecker: SystemdCheck{CheckName: "units", Units: units, Log: zerolog.Nop()},
			Timeout: 5 * time.Second}.Run(context.Background())
	}

	if err := run("web.service", "db.service"); err != nil {
		t.Fatalf("all units active: %v", err)
	}
	if got, want := readCalls(t, calls), []string{"is-active -- web.service", "is-active -- db.service"}; !slices.Equal(got, want) {
		t.Fatalf("systemctl called with %q, want %q", got, want)
	}

	for _, tc := range []struct {
		units []string
		want  string
	}{
		{[]string{"web.service", "fleet-no-such-unit-xyz.service", "db.service"}, "unit fleet-no-such-unit-xyz.service is inactive"},
		{[]string{"crashed.service", "web.service"}, "unit crashed.service is failed"},
	} {
		err := run(tc.units...)
		if err == nil {
			t.Errorf("%q: passed, want %q", tc.units, tc.want)
		} else if err.Error() != tc.want {
			t.Errorf("%q: err %q, want %q", tc.units, err, tc.want)
		}
	}
	// The check stops at the first unit that is not active.
	if got := readCalls(t, calls); len(got) != 5 || got[4] != "is-active -- crashed.service" {
		t.Errorf("systemctl calls %q: want the check to stop at the first inactive unit", got)
	}
}

// RunHealthChecks names the first failing check and honours the overall
// deadline even when a check would retry for longer.
func TestRunHealthChecks(t *testing.T) {
	log := zerolog.Nop()
	fc := &FileConfig{HealthChecks: []HealthCheck{
		{Name: "true", Type: CheckCommand, Command: []string{"/bin/true"}},
		{Name: "never", Type: CheckCommand, Command: []string{"/bin/false"}, Retries: 1000, Interval: Duration(50 * time.Millisecond)},
		{Name: "unreached", Type: CheckCommand, Command: []string{"/bin/true"}},
	}}
	if err := fc.Validate(); err != nil {
		t.Fatal(err)
	}
	checks := NewHealthChecks(fc, log)
	if len(checks) != 3 || checks[0].Retries != 3 || checks[0].Timeout != 10*time.Second {
		t.Fatalf("defaults not applied: %+v", checks)
	}
	start := time.Now()
	err := RunHealthChecks(context.Background(), checks, 2*time.Second)
	var cf *CheckFailed
	if !errors.As(err, &cf) || cf.Check != "never" {
		t.Fatalf("err %v, want check never to fail", err)
	}
	if d := time.Since(start); d > 8*time.Second {
		t.Fatalf("deadline ignored: %s", d)
	}
	if err := RunHealthChecks(context.Background(), checks[:1], time.Minute); err != nil {
		t.Fatal(err)
	}
}

func TestConfigRefusesBadChecks(t *testing.T) {
	for _, hc := range []HealthCheck{
		{Type: CheckCommand, Command: []string{"x"}},
		{Name: "a", Type: "ping"},
		{Name: "a", Type: CheckHTTP, URL: "ftp://x"},
		{Name: "a", Type: CheckHTTP, URL: "http://x", ExpectStatus: 42},
		{Name: "a", Type: CheckSystemd},
		{Name: "a", Type: CheckCommand},
		{Name: "a", Type: CheckCommand, Command: []string{"x"}, Retries: -1},
	} {
		fc := FileConfig{HealthChecks: []HealthCheck{hc}}
		if err := fc.Validate(); err == nil {
			t.Errorf("accepted %+v", hc)
		}
	}
}

// Without systemctl (or systemd) the check says so, not "unit X is ".
func TestSystemdCheckWithoutSystemctl(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	err := SystemdCheck{CheckName: "units", Units: []string{"web.service"}, Log: zerolog.Nop()}.Check(context.Background())
	if err == nil || !strings.Contains(err.Error(), "unit web.service: systemctl is-active") {
		t.Fatalf("no systemctl: %v", err)
	}
}
