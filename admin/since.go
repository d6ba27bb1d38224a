package admin

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Since is a duration flag that also takes days and weeks: 90m, 24h, 1d,
// 2w, 1w2d, 1d12h; 0 means everything.
type Since time.Duration

// ParseSince parses a duration with d (24h) and w (7d) units besides
// time.ParseDuration's.
func ParseSince(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if s == "0" {
		return 0, nil
	}
	var total time.Duration
	rest := s
	// Leading NNd / NNw parts, then whatever time.ParseDuration takes.
	for rest != "" {
		i := 0
		for i < len(rest) && rest[i] >= '0' && rest[i] <= '9' {
			i++
		}
		if i == 0 || i == len(rest) || (rest[i] != 'd' && rest[i] != 'w') {
			break
		}
		n, err := strconv.Atoi(rest[:i])
		if err != nil {
			return 0, fmt.Errorf("%q is not a duration (e.g. 90m, 24h, 1d, 2w)", s)
		}
		unit := 24 * time.Hour
		if rest[i] == 'w' {
			unit *= 7
		}
		total += time.Duration(n) * unit
		rest = rest[i+1:]
	}
	if rest != "" {
		d, err := time.ParseDuration(rest)
		if err != nil {
			return 0, fmt.Errorf("%q is not a duration (e.g. 90m, 24h, 1d, 2w)", s)
		}
		total += d
	}
	return total, nil
}

// UnmarshalText lets kong parse Since from flags, env and config files.
func (s *Since) UnmarshalText(b []byte) error {
	d, err := ParseSince(string(b))
	if err != nil {
		return err
	}
	*s = Since(d)
	return nil
}

// D is s as a time.Duration.
func (s Since) D() time.Duration { return time.Duration(s) }
