package agent

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
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

func TestSystemdCheckFailsForUnknownUnit(t *testing.T) {
	c := Retrying{HealthChecker: SystemdCheck{CheckName: "s", Units: []string{"fleet-no-such-unit-xyz.service"}, Log: zerolog.Nop()},
		Timeout: 5 * time.Second}
	if err := c.Run(context.Background()); err == nil {
		t.Fatal("an unknown unit counted as active")
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
