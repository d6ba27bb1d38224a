package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// flake.nix's vendorHash must be the hash of the module dependencies go.sum
// names, or `nix build` of the package fails on machines with nixpkgs. It is
// computed the way buildGoModule does: the NAR hash of `go mod vendor`.
func TestFlakeVendorHash(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	flake, err := os.ReadFile("../flake.nix")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`vendorHash = "(sha256-[A-Za-z0-9+/=]+)";`).FindSubmatch(flake)
	if m == nil {
		t.Fatal("flake.nix has no vendorHash = \"sha256-...\";")
	}
	vendor := filepath.Join(t.TempDir(), "vendor")
	cmd := exec.CommandContext(ctx, "go", "mod", "vendor", "-o", vendor)
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go mod vendor: %v\n%s", err, out)
	}
	cmd = exec.CommandContext(ctx, "nix", "hash", "path", vendor)
	cmd.Env = append(os.Environ(), "NIX_CONFIG=experimental-features = nix-command")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("nix hash path: %v", err)
	}
	if got := strings.TrimSpace(string(out)); got != string(m[1]) {
		t.Fatalf("flake.nix vendorHash is %s but the dependencies hash to %s: update flake.nix", m[1], got)
	}
}
