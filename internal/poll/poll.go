// Package poll waits in tests for a condition to hold, with a deadline: the
// one way tests here wait for something another process or goroutine does.
package poll

import (
	"testing"
	"time"
)

// Interval is how often Until checks its condition.
const Interval = 10 * time.Millisecond

// Until checks cond every Interval until it holds, and fails the test
// naming what it waited for when d passes first.
func Until(tb testing.TB, d time.Duration, what string, cond func() bool) {
	tb.Helper()
	Telling(tb, d, what, func() (bool, string) { return cond(), "" })
}

// Telling is Until for a condition that also says where things stand; the
// last word goes into the failure.
func Telling(tb testing.TB, d time.Duration, what string, cond func() (bool, string)) {
	tb.Helper()
	deadline := time.Now().Add(d)
	tick := time.NewTicker(Interval)
	defer tick.Stop()
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			if state != "" {
				tb.Fatalf("%s: not within %s; last: %s", what, d, state)
			}
			tb.Fatalf("%s: not within %s", what, d)
		}
		<-tick.C
	}
}
