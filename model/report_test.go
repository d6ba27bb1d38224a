package model

import (
	"testing"
	"time"
)

// A device bounds what a trigger's pace asks of it: nothing for none or a
// negative wait, never more than the maximums.
func TestPaceBounded(t *testing.T) {
	for _, c := range []struct {
		p               *Pace
		progress, splay time.Duration
	}{
		{nil, 0, 0},
		{&Pace{}, 0, 0},
		{&Pace{ProgressAfterMS: -5, FactsSplayMS: -1}, 0, 0},
		{&Pace{ProgressAfterMS: 2000, FactsSplayMS: 20000}, 2 * time.Second, 20 * time.Second},
		{&Pace{ProgressAfterMS: 1 << 62, FactsSplayMS: 1 << 62}, MaxProgressAfter, MaxFactsSplay},
	} {
		if got := c.p.ProgressAfter(); got != c.progress {
			t.Errorf("%+v: progress after %v, want %v", c.p, got, c.progress)
		}
		if got := c.p.FactsSplay(); got != c.splay {
			t.Errorf("%+v: facts splay %v, want %v", c.p, got, c.splay)
		}
	}
}
