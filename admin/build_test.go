package admin

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"fleet/model"
)

// nixEnv runs Nix offline as root on Debian's nix-bin: no sandbox, no build
// users, no default substituter to wait for.
func nixEnv(t *testing.T) {
	t.Helper()
	t.Setenv("NIX_CONFIG", "experimental-features = nix-command flakes\nsandbox = false\nbuild-users-group =\nsubstituters =\n")
}

// testFlake writes a flake with no inputs whose nixosConfigurations hold
// tiny systems built with /bin/sh, as the real thing would be built with
// nixpkgs.
func testFlake(t *testing.T, hosts ...string) string {
	t.Helper()
	sys := map[string]string{"amd64": "x86_64-linux", "arm64": "aarch64-linux"}[runtime.GOARCH]
	var b strings.Builder
	b.WriteString("{\n  outputs = { self }: let\n")
	b.WriteString(`    sys = name: derivation { inherit name; system = "` + sys + `"; builder = "/bin/sh"; args = [ "-c" "/bin/mkdir -p $out/bin; echo ${name} > $out/name" ]; };` + "\n")
	b.WriteString("  in {\n")
	for _, h := range hosts {
		b.WriteString("    nixosConfigurations." + h + ".config.system.build.toplevel = sys \"" + h + "-" + t.Name() + "-" + time.Now().Format("150405.000000") + "\";\n")
	}
	b.WriteString("  };\n}\n")
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "flake.nix"), []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestBuildFlakeHostsAndPush(t *testing.T) {
	nixEnv(t)
	dir := testFlake(t, "web1", "web2")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var log bytes.Buffer
	paths, err := BuildFlakeHosts(ctx, "path:"+dir+"#nixosConfigurations", []string{"web1", "web2"}, &log)
	if err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	for _, h := range []string{"web1", "web2"} {
		p := paths[h]
		if err := model.CheckStorePath(p); err != nil {
			t.Fatalf("%s: %v", h, err)
		}
		b, err := os.ReadFile(filepath.Join(p, "name"))
		if err != nil || !strings.HasPrefix(string(b), h+"-") {
			t.Fatalf("%s built %s holding %q (%v)", h, p, b, err)
		}
	}
	cache := t.TempDir()
	if err := PushClosures(ctx, "file://"+cache, []string{paths["web1"]}, &log); err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	narinfo := filepath.Join(cache, strings.SplitN(strings.TrimPrefix(paths["web1"], "/nix/store/"), "-", 2)[0]+".narinfo")
	if _, err := os.Stat(narinfo); err != nil {
		t.Fatalf("cache lacks %s: %v", narinfo, err)
	}
}

func TestBuildFlakeHostsErrors(t *testing.T) {
	// Without nix every build fails; the missing host must fail for its
	// own reason.
	if _, err := exec.LookPath("nix"); err != nil {
		t.Fatal("nix is not installed: run scripts/test-deps")
	}
	nixEnv(t)
	dir := testFlake(t, "web1")
	flake := "path:" + dir + "#nixosConfigurations"
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var log bytes.Buffer
	// A host the flake does not define: nix says which attribute is missing.
	_, err := BuildFlakeHosts(ctx, flake, []string{"db9"}, &log)
	wantErr := func(what string, err error, parts ...string) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: no error, want one saying %q", what, parts)
		}
		for _, p := range parts {
			if !strings.Contains(err.Error(), p) {
				t.Errorf("%s: error %q does not say %q", what, err, p)
			}
		}
	}
	wantErr("missing host", err, "build db9: nix build:", "does not provide attribute", "'nixosConfigurations.db9.config.system.build.toplevel'")
	if !strings.Contains(log.String(), "does not provide attribute") {
		t.Errorf("nix's error did not reach the log:\n%s", log.String())
	}
	// The host the flake does define builds with the same flake and nix.
	if paths, err := BuildFlakeHosts(ctx, flake, []string{"web1"}, &log); err != nil || model.CheckStorePath(paths["web1"]) != nil {
		t.Fatalf("web1 of the same flake: %v %v\n%s", paths, err, log.String())
	}

	_, err = BuildFlakeHosts(ctx, flake, []string{"bad name"}, &log)
	wantErr("bad host name", err, "not a valid host name")
	_, err = BuildFlakeHosts(ctx, "", nil, &log)
	wantErr("empty flake", err, "--flake needs --hosts")
	_, err = BuildFlakeHosts(ctx, flake, nil, &log)
	wantErr("no hosts", err, "--flake needs --hosts")
}

func TestDiffReleases(t *testing.T) {
	p := func(n string) string { return "/nix/store/" + strings.Repeat("a", 32) + "-" + n }
	a := &model.Release{Closures: map[string]string{"web1": p("1"), "web2": p("2"), "db": p("db")}}
	b := &model.Release{Closures: map[string]string{"web1": p("1"), "web2": p("2b"), "cache": p("c")}, Default: p("d")}
	d := DiffReleases(a, b)
	if len(d.Added) != 1 || d.Added[0].Host != "cache" || len(d.Removed) != 1 || d.Removed[0].Host != "db" ||
		len(d.Changed) != 1 || d.Changed[0].Host != "web2" || d.Changed[0].To != p("2b") || d.Default == nil {
		t.Fatalf("diff %+v", d)
	}
}
