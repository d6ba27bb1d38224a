package admin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
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
	"fleet/internal/poll"
	"fleet/model"
)

func start(t *testing.T) *broker.Coordinator {
	t.Helper()
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

func run(t *testing.T, c *broker.Coordinator, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	full := append([]string{"--server", c.ClientURL(), "--creds", filepath.Join(c.Config().DataDir, accounts.AdminCredsFile)}, args...)
	code := admin.Run(context.Background(), full, &out, &errb)
	return out.String(), errb.String(), code
}

// Token → agent enrols → devices ls shows it online with its groups.
func TestTokenEnrollDevicesLs(t *testing.T) {
	c := start(t)
	out, errs, code := run(t, c, "token", "create", "--group", "developers", "--group", "lab", "--uses", "2", "--ttl", "1h")
	if code != 0 {
		t.Fatalf("token create: %d %s", code, errs)
	}
	token := strings.TrimSpace(out)
	if strings.Count(out, "\n") != 1 || !strings.HasPrefix(token, model.TokenPrefix+".") {
		t.Fatalf("token create printed %q, want the token alone", out)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cr, err := agent.LoadOrEnroll(ctx, agent.EnrollOptions{
		Servers: []string{c.ClientURL()}, StateDir: t.TempDir(), Token: token, Hostname: "laptop1", Log: zerolog.Nop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	nc, err := agent.Connect(ctx, cr, agent.ConnOptions{Servers: []string{c.ClientURL()}, Name: "laptop1", Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()

	var ds []model.DeviceView
	poll.Until(t, 5*time.Second, "device listed online", func() bool {
		out, errs, code = run(t, c, "--json", "devices", "ls", "--group", "lab")
		if code != 0 {
			t.Fatalf("devices ls: %s", errs)
		}
		if err := json.Unmarshal([]byte(out), &ds); err != nil {
			t.Fatalf("devices ls --json: %v in %q", err, out)
		}
		return len(ds) == 1 && ds[0].Online
	})
	d := ds[0]
	if d.ID != cr.PublicKey() || d.Name != "laptop1" || strings.Join(d.Groups, ",") != "developers,lab" || d.Status != model.DeviceActive || d.LastSeen.IsZero() {
		t.Fatalf("device %+v", d)
	}
	// The table names it too, with a short ID.
	if out, _, _ = run(t, c, "devices", "ls"); !strings.Contains(out, "laptop1") || !strings.Contains(out, "ONLINE") ||
		!strings.Contains(out, cr.PublicKey()[:12]) || strings.Contains(out, cr.PublicKey()) {
		t.Errorf("table: %q", out)
	}
	if out, _, code = run(t, c, "devices", "show", "laptop1"); code != 0 || !strings.Contains(out, cr.PublicKey()) {
		t.Errorf("show: %q", out)
	}

	// token ls never shows the secret.
	pt, _ := model.ParseToken(token)
	out, _, code = run(t, c, "--json", "token", "ls")
	if code != 0 || strings.Contains(out, pt.Secret) || !strings.Contains(out, pt.ID) || !strings.Contains(out, `"used": 1`) {
		t.Errorf("token ls: %q", out)
	}
	if out, _, _ = run(t, c, "token", "ls"); strings.Contains(out, pt.Secret) || !strings.Contains(out, "USES LEFT") {
		t.Errorf("token ls table: %q", out)
	}
	if _, _, code = run(t, c, "token", "revoke", pt.ID); code != 0 {
		t.Error("token revoke failed")
	}
	if _, _, code = run(t, c, "--yes", "devices", "revoke", "laptop1"); code != 0 {
		t.Error("devices revoke failed")
	}
}

func TestCLIErrors(t *testing.T) {
	c := start(t)
	_, errs, code := run(t, c, "devices", "show", "nosuch")
	if code != 1 || !strings.Contains(errs, "no device matches") {
		t.Errorf("show unknown: %d %q", code, errs)
	}
	_, errs, code = run(t, c, "token", "create", "--group", "bad group!")
	if code != 1 || !strings.Contains(errs, "not a valid group") {
		t.Errorf("bad group: %d %q", code, errs)
	}
	_, errs, code = run(t, c, "token", "create")
	if code != 2 || !strings.Contains(errs, "--group") {
		t.Errorf("missing group: %d %q", code, errs)
	}
	var out, eb bytes.Buffer
	if code := admin.Run(context.Background(), []string{"devices", "ls"}, &out, &eb); code != 1 || !strings.Contains(eb.String(), "--creds") {
		t.Errorf("no creds: %d %q", code, eb.String())
	}
	// --config supplies the global flags.
	cfg := filepath.Join(t.TempDir(), "admin.json")
	b, _ := json.Marshal(map[string]any{"server": c.ClientURL(), "creds": filepath.Join(c.Config().DataDir, accounts.AdminCredsFile), "json": true})
	if err := os.WriteFile(cfg, b, 0o600); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	eb.Reset()
	if code := admin.Run(context.Background(), []string{"--config", cfg, "devices", "ls"}, &out, &eb); code != 0 || strings.TrimSpace(out.String()) != "[]" {
		t.Errorf("--config: %d %q %q", code, out.String(), eb.String())
	}
}
