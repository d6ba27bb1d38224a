package admin

import "testing"

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"20GiB": 20 << 30, "512MiB": 512 << 20, "1T": 1 << 40, "100": 100, "100B": 100, "3 kb": 3 << 10} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("%q: %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "GiB", "-1G", "x", "1.5G", "99999999999T"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}
