package broker

import (
	"runtime/debug"
	"runtime/metrics"
	"testing"
	"time"

	"fleet/internal/poll"
)

// A batch's hold raises GOGC and the last release puts back what was set,
// whatever the order; a higher GOGC, or none, is left alone.
func TestGCHoldRestores(t *testing.T) {
	orig := debug.SetGCPercent(100)
	t.Cleanup(func() { debug.SetGCPercent(orig) })
	// Read without writing: a hold's timer may set it at any moment.
	gcPercent := func() int {
		s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
		metrics.Read(s)
		return int(s[0].Value.Uint64())
	}

	var g gcHold
	r1 := g.hold()
	r2 := g.hold()
	if p := gcPercent(); p != batchGCPercent {
		t.Fatalf("held: GOGC %d, want %d", p, batchGCPercent)
	}
	r1()
	r1() // a second call changes nothing
	if p := gcPercent(); p != batchGCPercent {
		t.Fatalf("one hold left: GOGC %d", p)
	}
	r2()
	if p := gcPercent(); p != 100 {
		t.Fatalf("released: GOGC %d, want 100", p)
	}
	// A hold nobody releases (a batch that hangs) ends by itself.
	debug.SetGCPercent(100)
	hung := gcHold{maxHold: 50 * time.Millisecond}
	late := hung.hold()
	poll.Until(t, 5*time.Second, "the hung hold to end", func() bool { return gcPercent() == 100 })
	late() // the batch ends after all: nothing more changes
	if p := gcPercent(); p != 100 {
		t.Fatalf("a late release: GOGC %d", p)
	}
	for _, set := range []int{-1, 800} {
		debug.SetGCPercent(set)
		release := g.hold()
		if p := gcPercent(); p != set {
			t.Errorf("GOGC %d held: %d", set, p)
		}
		release()
		if p := gcPercent(); p != set {
			t.Errorf("GOGC %d released: %d", set, p)
		}
	}
}
