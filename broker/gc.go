package broker

import (
	"cmp"
	"runtime/debug"
	"sync"
	"time"
)

// Writing and telling a large batch is the one moment of a rollout that
// every device of the batch waits on, and it allocates (the batch's
// encoded states, the acknowledgements, the triggers) on a heap that the
// fleet's connections make large: a collection started then takes a
// quarter of the CPU and slows every allocation of the batch. At 10,000
// devices, the batch was written 0.2–0.25 s sooner with the collector held
// back for it, the last trigger out 0.2–0.4 s sooner, and the peak memory
// no higher (BENCHMARKS.md): what the batch allocates is collected just
// after, instead of during.

// batchGCPercent is the GOGC a large batch is written under, and
// batchGCFrom the size of batch that is large.
const (
	batchGCPercent = 400
	batchGCFrom    = 1000
	// maxBatchGCHold bounds a hold: a batch of 10,000 takes under a
	// second.
	maxBatchGCHold = 10 * time.Second
)

// gcHold raises GOGC to batchGCPercent while at least one hold is taken.
// A GOGC already higher, or off, is left alone; a memory limit
// (GOMEMLIMIT) still applies throughout.
type gcHold struct {
	// maxHold bounds a hold (0: maxBatchGCHold).
	maxHold time.Duration

	mu    sync.Mutex
	holds int
	prev  int
}

// batchGC is the process's one hold: GOGC belongs to the process, and
// coordinators sharing one (tests run three) must not restore each
// other's raised value.
var batchGC gcHold

// hold raises GOGC (the first hold) and returns the release.
func (g *gcHold) hold() (release func()) {
	g.mu.Lock()
	if g.holds == 0 {
		g.prev = debug.SetGCPercent(batchGCPercent)
		if g.prev < 0 || g.prev >= batchGCPercent {
			debug.SetGCPercent(g.prev)
		}
	}
	g.holds++
	g.mu.Unlock()
	var once sync.Once
	done := func() {
		once.Do(func() {
			g.mu.Lock()
			defer g.mu.Unlock()
			if g.holds--; g.holds == 0 {
				debug.SetGCPercent(g.prev)
			}
		})
	}
	// A batch that hangs (JetStream away, writes timing out) must not
	// keep the heap growing at 5× its live size: the hold ends by itself.
	t := time.AfterFunc(cmp.Or(g.maxHold, maxBatchGCHold), done)
	return func() {
		t.Stop()
		done()
	}
}
