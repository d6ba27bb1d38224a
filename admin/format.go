package admin

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"fleet/model"
)

// Output for people: counts with their noun in the right number, lists as
// "1, 2", short device IDs in tables (the full ID is in --json and show),
// times in the local zone with the zone named, durations as 24h or 1h30m.

// plural is "1 device", "3 devices".
func plural(n int, one, many string) string {
	return fmt.Sprintf("%d %s", n, noun(n, one, many))
}

// noun is one when n is 1, else many.
func noun(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// intList is "1, 2, 10".
func intList(ns []int) string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ", ")
}

// shortIDLen is how much of a device ID (a 56-character nkey) a table
// shows: enough to tell devices apart and to pass to commands that take
// an ID prefix.
const shortIDLen = 12

// shortID shortens a device ID for a table.
func shortID(id string) string {
	if len(id) <= shortIDLen {
		return id
	}
	return id[:shortIDLen]
}

// localTime is t in the local zone, with the zone's name.
func localTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04:05 MST")
}

// durationText is d as people write it: 24h, 1h30m, 5m, 90s, 1.5s.
func durationText(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// ago is how long ago t was, to the second ("-" for never).
func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := time.Since(t).Round(time.Second)
	if d < 0 {
		d = 0
	}
	return durationText(d) + " ago"
}

// stateText is how tables name a device's rollout state: as JSON does.
func stateText(s model.DeviceRolloutState) string { return string(s) }
