// Package dirstate records what files a directory holds, byte for byte, so
// tests can check that a refused operation changed nothing on disk.
package dirstate

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"testing"
)

// State maps each file under a directory to its contents.
type State map[string][]byte

// Read records every file under dir; a missing dir is an empty State.
func Read(dir string) (State, error) {
	s := State{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) && p == dir {
			return nil
		}
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		s[p] = b
		return err
	})
	return s, err
}

// Diff lists what changed from before to after: files removed, changed or
// created, sorted.
func Diff(before, after State) []string {
	var out []string
	for p, b := range before {
		if a, ok := after[p]; !ok {
			out = append(out, p+" was removed")
		} else if !bytes.Equal(a, b) {
			out = append(out, p+" was changed")
		}
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			out = append(out, p+" was created")
		}
	}
	sort.Strings(out)
	return out
}

// Take records dir for a test, failing it when dir cannot be read.
func Take(tb testing.TB, dir string) State {
	tb.Helper()
	s, err := Read(dir)
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

// Unchanged fails the test for every file that differs from before to after.
func Unchanged(tb testing.TB, before, after State) {
	tb.Helper()
	for _, d := range Diff(before, after) {
		tb.Error(d)
	}
}
