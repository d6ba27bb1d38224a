package dirstate

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestDiff(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "sub", "b")
	os.MkdirAll(filepath.Dir(b), 0o700)
	os.WriteFile(a, []byte("1"), 0o600)
	os.WriteFile(b, []byte("2"), 0o600)
	before, err := Read(dir)
	if err != nil || len(before) != 2 {
		t.Fatalf("read: %v %v", before, err)
	}
	if d := Diff(before, before); len(d) != 0 {
		t.Fatalf("no change reported as %v", d)
	}
	os.WriteFile(a, []byte("x"), 0o600)
	os.Remove(b)
	c := filepath.Join(dir, "c")
	os.WriteFile(c, nil, 0o600)
	after, _ := Read(dir)
	want := []string{a + " was changed", b + " was removed", c + " was created"}
	slices.Sort(want)
	if d := Diff(before, after); !slices.Equal(d, want) {
		t.Fatalf("diff %v, want %v", d, want)
	}
	if s, err := Read(filepath.Join(dir, "missing")); err != nil || len(s) != 0 {
		t.Fatalf("missing dir: %v %v", s, err)
	}
}
