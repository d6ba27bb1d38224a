package accounts

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// WriteSecretFile makes missing directories (0700), leaves the file 0600
// whatever it replaced, and leaves no temporary file behind.
func TestWriteSecretFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state", "agent")
	path := filepath.Join(dir, "secret.json")
	for _, body := range []string{"first", "second, longer"} {
		if err := WriteSecretFile(path, []byte(body)); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(path)
		if err != nil || string(got) != body {
			t.Fatalf("read back %q, %v; want %q", got, err, body)
		}
		if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("file mode %v, %v; want 0600", fi.Mode().Perm(), err)
		}
		if err := os.Chmod(path, 0o644); err != nil { // the next write must not keep it
			t.Fatal(err)
		}
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("directory mode %v, %v; want 0700", fi.Mode().Perm(), err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 1 {
		t.Fatalf("directory holds %v (%v); want the file alone", entries, err)
	}
	// A directory that cannot be written: an error naming the file, and
	// the old file intact.
	if os.Geteuid() != 0 {
		if err := os.Chmod(dir, 0o500); err != nil {
			t.Fatal(err)
		}
		defer os.Chmod(dir, 0o700)
		if err := WriteSecretFile(path, []byte("third")); err == nil || !strings.Contains(err.Error(), path) {
			t.Fatalf("write into a read-only directory: %v", err)
		}
	}
}
