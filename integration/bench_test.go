package integration

import (
	"context"
	"encoding/json"
	"os/exec"
	"testing"
	"time"

	"fleet/bench"
)

// The bench at a small fleet, as a smoke test: its figures are not judged
// here (BENCHMARKS.md has them), what it shows is. Every simulated agent
// gets the deploy exactly once, both rollouts succeed, status lists every
// device, and the raw NATS baseline ran beside it (its durable round too:
// a bucket written, every connection told).
func TestBenchSmoke(t *testing.T) {
	const n = 200
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	cmd := exec.CommandContext(ctx, benchBin, "run", "--devices", "200", "--per-process", "100", "--idle", "1s", "--json", "--dir", dir)
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("fleet-bench: %v\n%s", err, stderr)
	}
	var r bench.Result
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("fleet-bench --json: %v\n%s", err, out)
	}
	for _, ro := range []bench.Rollout{r.All, r.Staged} {
		if ro.State != "succeeded" || ro.Notified != n || ro.SwitchesPerDevice != 1 || ro.TriggersPerDevice != 1 {
			t.Errorf("%s rollout: %s, %d of %d devices acted, %.2f applies and %.2f triggers per device; want succeeded, all, exactly 1 each",
				ro.Strategy, ro.State, ro.Notified, n, ro.SwitchesPerDevice, ro.TriggersPerDevice)
		}
		// Each trigger's arrival was read off its device's socket.
		if ro.Notify.N != n || ro.Notify.P50 <= 0 || ro.Notify.Max > ro.Succeeded {
			t.Errorf("%s rollout: %d of %d triggers' arrivals measured (p50 %.3f s, max %.3f s, succeeded after %.3f s)",
				ro.Strategy, ro.Notify.N, n, ro.Notify.P50, ro.Notify.Max, ro.Succeeded)
		}
	}
	if len(r.Staged.Batches) != 4 {
		t.Errorf("staged rollout batches %v, want 4", r.Staged.Batches)
	}
	if r.StatusN != n || r.EnrollRetries != 0 || r.FactsPS <= 0 || r.PeakRSS <= 0 {
		t.Errorf("status rows %d (want %d), enrol retries %d (want 0), facts/s %.0f, peak RSS %d", r.StatusN, n, r.EnrollRetries, r.FactsPS, r.PeakRSS)
	}
	if r.Raw == nil || r.Raw.Notify.N != n || r.Raw.Get.N != n || r.Raw.Durable.N != n || r.Raw.PeakRSS < r.Raw.IdleRSS {
		t.Errorf("raw baseline: %+v, want %d notifies, requests and written-then-told notifies, and its peak RSS", r.Raw, n)
	} else if r.Raw.DurableBytes < 500 {
		t.Errorf("raw durable baseline wrote %d-byte values; want a desired state's size (a signed release and deploy)", r.Raw.DurableBytes)
	}
}
