package poll

import (
	"testing"
	"time"
)

// fatalTB records a Fatalf instead of ending the test.
type fatalTB struct {
	testing.TB
	failed bool
}

func (f *fatalTB) Helper()               {}
func (f *fatalTB) Fatalf(string, ...any) { f.failed = true; panic(f) }

func TestUntil(t *testing.T) {
	n := 0
	Until(t, time.Second, "third check", func() bool { n++; return n == 3 })
	if n != 3 {
		t.Fatalf("checked %d times", n)
	}
	f := &fatalTB{TB: t}
	func() {
		defer func() { _ = recover() }()
		Until(f, 30*time.Millisecond, "never", func() bool { return false })
	}()
	if !f.failed {
		t.Fatal("a condition that never holds did not fail the test")
	}
}
