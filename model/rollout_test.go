package model

import (
	"fmt"
	"testing"
)

func TestBatchSizes(t *testing.T) {
	cases := []struct {
		spec  string
		total int
		want  string
	}{
		{"1,10%,100%", 10, "[1 9]"}, // 10% of 10 adds nobody after the canary
		{"1,50%", 20, "[1 9 10]"},   // a last 100% is implied
		{"1,100%", 1, "[1]"},
		{"100%", 3, "[3]"},
		{"10%", 3, "[1 2]"}, // a percentage rounds up: never an empty first batch
		{"2,5,100%", 4, "[2 2]"},
	}
	for _, c := range cases {
		bs, err := ParseBatches(c.spec)
		if err != nil {
			t.Fatalf("%s: %v", c.spec, err)
		}
		if got := fmt.Sprint(BatchSizes(bs, c.total)); got != c.want {
			t.Errorf("%s of %d: %s, want %s", c.spec, c.total, got, c.want)
		}
	}
	for _, bad := range []string{"", "0", "150%", "x", "-1", "1,,2", "0%", "NaN%", "1,1", "50%,10%", "5,2,100%"} {
		if _, err := ParseBatches(bad); err == nil {
			t.Errorf("ParseBatches(%q) accepted", bad)
		}
	}
}

func FuzzParseBatches(f *testing.F) {
	for _, s := range []string{"1,10%,100%", "0", "150%", "x", "1,50%", "99.5%"} {
		f.Add(s, 17)
	}
	f.Fuzz(func(t *testing.T, spec string, total int) {
		bs, err := ParseBatches(spec)
		if err != nil {
			return
		}
		if total < 0 || total > 100000 {
			return
		}
		sum := 0
		for _, n := range BatchSizes(bs, total) {
			if n <= 0 {
				t.Fatalf("%q of %d: empty batch", spec, total)
			}
			sum += n
		}
		if sum != total {
			t.Fatalf("%q of %d: batches cover %d devices", spec, total, sum)
		}
	})
}
