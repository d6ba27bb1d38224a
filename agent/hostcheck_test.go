package agent

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/broker"
	"fleet/internal/lockedbuf"
	"fleet/internal/poll"
)

// The host is checked at start: each problem names its flag.
func TestCheckHost(t *testing.T) {
	dir := t.TempDir()
	current := filepath.Join(dir, "current-system")
	if err := os.Symlink(dir, current); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "a-file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// A state dir that cannot be made (under a file; as root, a mode
	// would not stop the write).
	if err := CheckHost(filepath.Join(file, "state"), current); err == nil || !strings.Contains(err.Error(), "--state-dir "+filepath.Join(file, "state")) {
		t.Errorf("state dir under a file: %v", err)
	}
	// No link to the running system.
	if err := CheckHost(filepath.Join(dir, "state"), filepath.Join(dir, "no-such-link")); err == nil ||
		!strings.Contains(err.Error(), "--current-system "+filepath.Join(dir, "no-such-link")) {
		t.Errorf("no current system: %v", err)
	}
	// A dangling link is no running system either.
	dangling := filepath.Join(dir, "dangling")
	if err := os.Symlink(filepath.Join(dir, "gone"), dangling); err != nil {
		t.Fatal(err)
	}
	if err := CheckHost(filepath.Join(dir, "state"), dangling); err == nil || !strings.Contains(err.Error(), "--current-system") {
		t.Errorf("dangling current system: %v", err)
	}
	// No Nix on PATH.
	t.Run("no nix", func(t *testing.T) {
		t.Setenv("PATH", t.TempDir())
		if err := CheckHost(filepath.Join(dir, "state"), current); err == nil || !strings.Contains(err.Error(), "nix, nix-store, nix-env not on PATH") {
			t.Errorf("no nix: %v", err)
		}
	})
	if _, err := exec.LookPath("nix"); err != nil {
		t.Log("no nix on this host: the passing case is not checked")
		return
	}
	if err := CheckHost(filepath.Join(dir, "state"), current); err != nil {
		t.Errorf("a good host: %v", err)
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, "state")); len(entries) != 0 {
		t.Errorf("the write check left %v", entries)
	}
}

// The agent's connection log says which of a closed port, a port that is
// not NATS (an HTTP one) and refused credentials it met, within 2s.
func TestConnectErrorsNamed(t *testing.T) {
	start := func() *broker.Coordinator {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		cfg := broker.DefaultConfig()
		cfg.DataDir, cfg.Listen, cfg.HTTP = t.TempDir(), ln.Addr().String(), ""
		ln.Close()
		c, err := broker.Start(context.Background(), cfg, zerolog.Nop())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		return c
	}
	a, b := start(), start()
	foreign, err := accounts.ReadCreds(filepath.Join(b.Config().DataDir, accounts.AdminCredsFile))
	if err != nil {
		t.Fatal(err)
	}
	web := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer web.Close()
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := ln.Addr().String()
	ln.Close()

	for _, tc := range []struct{ name, url, says, reason string }{
		{"closed port", "nats://" + closed, "nothing listens at " + closed, "connection_refused"},
		{"HTTP port", "nats://" + web.Listener.Addr().String(), "does not speak NATS", "not_nats"},
		{"refused creds", a.ClientURL(), "refused the credentials", "credentials_refused"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var logs lockedbuf.Buffer
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			began := time.Now()
			nc, err := Connect(ctx, foreign, ConnOptions{Servers: []string{tc.url}, Name: "t", Log: zerolog.New(&logs)})
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			poll.Telling(t, 2*time.Second, "a log line naming the failure", func() (bool, string) {
				s := logs.String()
				return strings.Contains(s, tc.says) && strings.Contains(s, `"reason":"`+tc.reason+`"`), s
			})
			t.Logf("named after %s", time.Since(began))
		})
	}
}
