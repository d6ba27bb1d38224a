package integration

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"fleet/nixtest"
)

// runDemo runs scripts/demo with the binaries TestMain built, free ports
// and env (DEMO_DIR etc.) on top of this process's environment.
func runDemo(t *testing.T, env ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", filepath.Join("..", "scripts", "demo"))
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "DEMO_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "DEMO_BIN="+filepath.Dir(adminBin), "DEMO_KEEP=0")
	cmd.Env = append(cmd.Env, env...)
	// The script and everything it starts share a process group, so a
	// deadline stops all of it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// `task demo` end to end: three agents enrol, the canary rollout of gen2
// succeeds on all of them, and every process is gone afterwards.
func TestDemo(t *testing.T) {
	nixtest.Require(t)
	dir := filepath.Join(t.TempDir(), "demo")
	listen := freeAddr(t)
	out, err := runDemo(t, "DEMO_DIR="+dir, "DEMO_LISTEN="+listen, "DEMO_HTTP="+freeAddr(t))
	if err != nil {
		t.Fatalf("scripts/demo: %v\n%s", err, out)
	}
	for _, want := range []string{
		"3/3 succeeded, 0 failed",
		"of rel-gen2 (group demo): succeeded",
		"What you just saw",
	} {
		if !strings.Contains(out, want) {
			t.Fatalf("output lacks %q:\n%s", want, out)
		}
	}
	// The last devices ls: three active devices, online, by name with a
	// short ID.
	online := regexp.MustCompile(`(?m)^demo-[123]\s+U[A-Z0-9]{11}\s+demo\s+active\s+yes\s`)
	ls := out[strings.LastIndex(out, "fleet-admin devices ls"):]
	if n := len(online.FindAllString(ls, -1)); n != 3 {
		t.Fatalf("%d online demo devices in the last devices ls, want 3:\n%s", n, out)
	}
	for _, h := range []string{"demo-1", "demo-2", "demo-3"} {
		cur := nixtest.Readlink(filepath.Join(dir, "agents", h, "run", "current-system"))
		if !strings.HasSuffix(cur, "-fleet-demo-gen2") {
			t.Fatalf("%s runs %q, want gen2\n%s", h, cur, out)
		}
	}
	if c, err := net.DialTimeout("tcp", listen, time.Second); err == nil {
		c.Close()
		t.Fatalf("the demo's coordinator still listens on %s after the script ended", listen)
	}
}

// The demo never wipes a dir it did not create.
func TestDemoRefusesForeignDir(t *testing.T) {
	nixtest.Require(t)
	dir := t.TempDir()
	keep := filepath.Join(dir, "precious")
	if err := os.WriteFile(keep, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := runDemo(t, "DEMO_DIR="+dir, "DEMO_LISTEN="+freeAddr(t), "DEMO_HTTP="+freeAddr(t))
	if err == nil || !strings.Contains(out, "was not made by this demo") {
		t.Fatalf("want a refusal, got %v:\n%s", err, out)
	}
	if _, err := os.Stat(keep); err != nil {
		t.Fatalf("the foreign dir was touched: %v", err)
	}
}
