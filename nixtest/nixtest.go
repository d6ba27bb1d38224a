// Package nixtest builds tiny NixOS-like "systems" with the real Nix of the
// host, signs them, publishes them to an HTTP binary cache and removes them
// from the local store, so tests exercise real fetching, signature checks
// and switching without nixpkgs. It needs Nix (Debian's nix-bin) and root.
//
// Each system is a derivation built by /bin/sh whose
// bin/switch-to-configuration appends "<action> <own path>" to the Env's
// switch log and points the Env's current-system link at itself. A system
// built with a gate blocks in switch-to-configuration (after logging
// "begin <action> <path>") until the test opens its gate.
package nixtest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Env is one test's Nix sandbox: a work dir, a binary cache served over
// HTTP and a trusted signing key.
type Env struct {
	Dir string
	// CacheDir is the file:// binary cache that Substituter serves.
	CacheDir    string
	Substituter string
	// TrustedKey signs closures the agent accepts; PublicKey is its public
	// half, as written in trusted-public-keys.
	TrustedKey Key
	// SwitchLog collects one line per switch-to-configuration run.
	SwitchLog string
	// CurrentSystem and Profile are where the test systems and the agent
	// keep the "running system" link and the system profile.
	CurrentSystem string
	Profile       string

	srv *http.Server
	// down makes the cache answer 503, like a cache being restarted.
	down atomic.Bool
}

// SetCacheDown makes the HTTP binary cache answer every request with 503
// (true) or serve again (false).
func (e *Env) SetCacheDown(down bool) { e.down.Store(down) }

// Key is a binary-cache signing key pair.
type Key struct {
	Name       string
	SecretFile string
	Public     string
}

// System is one built test system.
type System struct {
	Name string
	Path string
	// Gate, when not empty, is a fifo switch-to-configuration waits on.
	Gate string
}

// Available reports why real Nix tests cannot run here ("" when they can).
func Available() string {
	if os.Geteuid() != 0 {
		return "nix tests need root (single-user Nix store)"
	}
	for _, b := range []string{"nix", "nix-store", "nix-env", "nix-build"} {
		if _, err := exec.LookPath(b); err != nil {
			return b + " not found (install Debian's nix-bin)"
		}
	}
	return ""
}

// Require fails the test when Nix cannot run here: the suite runs real Nix
// and must not pass by skipping it.
func Require(tb testing.TB) {
	tb.Helper()
	if why := Available(); why != "" {
		tb.Fatalf("%s: the suite runs real Nix (install it with scripts/test-deps, as root)", why)
	}
}

// New creates an Env in dir (a test's temp dir), with a trusted key and a
// cache served on 127.0.0.1. Close stops the server.
func New(ctx context.Context, dir string) (*Env, error) {
	e := &Env{
		Dir:           dir,
		CacheDir:      filepath.Join(dir, "cache"),
		SwitchLog:     filepath.Join(dir, "switch.log"),
		CurrentSystem: filepath.Join(dir, "run", "current-system"),
		Profile:       filepath.Join(dir, "profiles", "system"),
	}
	for _, d := range []string{e.CacheDir, filepath.Dir(e.CurrentSystem), filepath.Dir(e.Profile)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("nixtest: %w", err)
		}
	}
	k, err := e.NewKey(ctx, "fleet-test-trusted")
	if err != nil {
		return nil, err
	}
	e.TrustedKey = k
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("nixtest: listen: %w", err)
	}
	files := http.FileServer(http.Dir(e.CacheDir))
	e.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if e.down.Load() {
			http.Error(w, "cache restarting", http.StatusServiceUnavailable)
			return
		}
		files.ServeHTTP(w, r)
	}), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = e.srv.Serve(ln) }()
	e.Substituter = "http://" + ln.Addr().String()
	return e, nil
}

// Close stops the cache server.
func (e *Env) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return e.srv.Shutdown(ctx)
}

// NixConfig is the NIX_CONFIG for processes that should trust only the
// Env's key and query no substituter of their own.
func (e *Env) NixConfig() string {
	return strings.Join([]string{
		"experimental-features = nix-command",
		"sandbox = false",
		"build-users-group =",
		"substituters =",
		"trusted-public-keys = " + e.TrustedKey.Public,
	}, "\n")
}

// Environ is os.Environ with NIX_CONFIG set to NixConfig.
func (e *Env) Environ() []string {
	env := make([]string, 0, len(os.Environ())+1)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "NIX_CONFIG=") {
			env = append(env, kv)
		}
	}
	return append(env, "NIX_CONFIG="+e.NixConfig())
}

// NewKey generates a signing key; a key other than TrustedKey is untrusted.
func (e *Env) NewKey(ctx context.Context, name string) (Key, error) {
	sk := filepath.Join(e.Dir, name+".sk")
	pk := filepath.Join(e.Dir, name+".pk")
	if _, err := e.run(ctx, "nix-store", "--generate-binary-cache-key", name, sk, pk); err != nil {
		return Key{}, err
	}
	b, err := os.ReadFile(pk)
	if err != nil {
		return Key{}, fmt.Errorf("nixtest: %w", err)
	}
	return Key{Name: name, SecretFile: sk, Public: strings.TrimSpace(string(b))}, nil
}

// BuildOpts vary a test system.
type BuildOpts struct {
	// Gated: switch-to-configuration blocks on a fifo until OpenGate.
	Gated bool
	// Unhealthy: the system holds a file named "unhealthy", which a test's
	// health check can look for (see UnhealthyCheck).
	Unhealthy bool
	// FailSwitch: switch-to-configuration logs "fail <action> <path>" and
	// exits 1 without touching the current-system link, like an activation
	// or boot loader installation that fails.
	FailSwitch bool
}

// UnhealthyCheck is argv of a command health check that fails while the
// running system is one built with Unhealthy.
func (e *Env) UnhealthyCheck() []string {
	return []string{"/bin/sh", "-c", "test ! -e " + shq(e.CurrentSystem+"/unhealthy")}
}

// Build builds one system named name.
func (e *Env) Build(ctx context.Context, name string, o BuildOpts) (System, error) {
	s := System{Name: name}
	gateCmd := ""
	if o.Gated {
		s.Gate = filepath.Join(e.Dir, "gate-"+name)
		if err := syscall.Mkfifo(s.Gate, 0o600); err != nil {
			return System{}, fmt.Errorf("nixtest: mkfifo: %w", err)
		}
		// read blocks until the test opens the fifo for writing.
		gateCmd = fmt.Sprintf(`echo "begin $1 $self" >> %s; read x < %s; `, shq(e.SwitchLog), shq(s.Gate))
	}
	// The builder writes the script through an unquoted here-document so
	// $out expands to the system's own path; every other $ is escaped.
	if o.FailSwitch {
		gateCmd += fmt.Sprintf(`echo "fail $1 $self" >> %s; echo "switch-to-configuration: cannot $1" >&2; exit 1; `, shq(e.SwitchLog))
	}
	body := gateCmd +
		fmt.Sprintf(`echo "$1 $self" >> %s; `, shq(e.SwitchLog)) +
		fmt.Sprintf(`if [ "$1" != boot ]; then /bin/ln -sfn "$self" %s; fi`, shq(e.CurrentSystem)) + "\n"
	script := "#!/bin/sh\nself=$out\n" + strings.ReplaceAll(body, "$", `\$`)
	builder := "/bin/mkdir -p $out/bin $out/kernel-modules\n" +
		"echo " + shq(name) + " > $out/nixos-version\n" +
		"echo kernel > $out/kernel\necho initrd > $out/initrd\n" +
		"/bin/cat > $out/bin/switch-to-configuration <<EOS\n" + script + "EOS\n" +
		"/bin/chmod +x $out/bin/switch-to-configuration\n"
	if o.Unhealthy {
		builder += "echo 1 > $out/unhealthy\n"
	}
	expr := fmt.Sprintf("derivation { name = %s; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" %s ]; testDir = %s; }",
		nixStr(name), nixStr(builder), nixStr(e.Dir))
	file := filepath.Join(e.Dir, name+".nix")
	if err := os.WriteFile(file, []byte(expr), 0o644); err != nil {
		return System{}, fmt.Errorf("nixtest: %w", err)
	}
	out, err := e.run(ctx, "nix-build", "--no-out-link", file)
	if err != nil {
		return System{}, err
	}
	s.Path = lastLine(out)
	if !strings.HasPrefix(s.Path, "/nix/store/") {
		return System{}, fmt.Errorf("nixtest: nix-build printed %q, not a store path", s.Path)
	}
	return s, nil
}

// Publish signs s with k, copies it to the cache and deletes it from the
// local store, so only a fetch brings it back.
func (e *Env) Publish(ctx context.Context, s System, k Key) error {
	if _, err := e.run(ctx, "nix", "store", "sign", "--key-file", k.SecretFile, s.Path); err != nil {
		return err
	}
	if _, err := e.run(ctx, "nix", "copy", "--to", "file://"+e.CacheDir, s.Path); err != nil {
		return err
	}
	return e.Delete(ctx, s.Path)
}

// Delete removes path from the local store.
func (e *Env) Delete(ctx context.Context, path string) error {
	_, err := e.run(ctx, "nix-store", "--delete", path)
	return err
}

// Valid reports whether path is in the local store.
func (e *Env) Valid(ctx context.Context, path string) bool {
	_, err := e.run(ctx, "nix-store", "--check-validity", path)
	return err == nil
}

// Install makes s the running system: the profile's first generation and
// the current-system link, as if the machine had booted it.
func (e *Env) Install(ctx context.Context, s System) error {
	if _, err := e.run(ctx, "nix-env", "-p", e.Profile, "--set", s.Path); err != nil {
		return err
	}
	if err := os.Symlink(s.Path, e.CurrentSystem); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("nixtest: %w", err)
	}
	return nil
}

// OpenGate lets a gated switch-to-configuration go on. It blocks until the
// switch opens its end, or ctx ends.
func (e *Env) OpenGate(ctx context.Context, s System) error {
	if s.Gate == "" {
		return fmt.Errorf("nixtest: system %s has no gate", s.Name)
	}
	done := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(s.Gate, os.O_WRONLY, 0)
		if err == nil {
			_, err = f.WriteString("go\n")
			f.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Switches returns the switch log's lines.
func (e *Env) Switches() []string {
	b, err := os.ReadFile(e.SwitchLog)
	if err != nil {
		return nil
	}
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	return lines
}

// Readlink follows link one step ("" when it is missing).
func Readlink(link string) string {
	t, _ := os.Readlink(link)
	return t
}

// ProfileTarget resolves the profile to the store path it points at.
func (e *Env) ProfileTarget() string {
	t, err := filepath.EvalSymlinks(e.Profile)
	if err != nil {
		return ""
	}
	return t
}

func (e *Env) run(ctx context.Context, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = e.Environ()
	var out, errb bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("nixtest: %s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// shq quotes s for /bin/sh.
func shq(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// nixStr quotes s as a Nix string.
func nixStr(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "${", `\${`, "\n", `\n`)
	return `"` + r.Replace(s) + `"`
}
