package bench

import (
	"fmt"
	"io"
	"text/tabwriter"
)

// Print writes the figures as a table, fleet beside raw NATS where the
// baseline has the same figure.
func Print(w io.Writer, r *Result) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "fleet-bench: %d devices in %d simulator processes at nice %d (real agent loops, instant activator, state in %s), load average %.1f → %.1f\n\n",
		r.Devices, r.Processes, r.SimNice, r.DeviceDir, r.LoadStart, r.LoadEnd)
	fmt.Fprintln(tw, "FIGURE\tFLEET\tRAW NATS\tFLEET/RAW")
	ratio := func(a, b float64) string {
		if b <= 0 {
			return "-"
		}
		return fmt.Sprintf("%.1f×", a/b)
	}
	var raw RawResult
	if r.Raw != nil {
		raw = *r.Raw
	}
	lat := func(l Latency) string { return fmt.Sprintf("%.3f / %.3f / %.3f s", l.P50, l.P99, l.Max) }
	rawLat := func(l Latency) string {
		if r.Raw == nil {
			return "-"
		}
		return lat(l)
	}
	fmt.Fprintf(tw, "deploy all → trigger with the state at the agent's socket, p50 / p99 / max\t%s\t%s\t%s (p99)\n",
		lat(r.All.Notify), rawLat(raw.Notify), ratio(r.All.Notify.P99, raw.Notify.P99))
	if r.Raw != nil && raw.DurableBytes > 0 {
		fmt.Fprintf(tw, "  the same, raw with each state (%d bytes) written to a KV bucket, told as acknowledged\t%s\t%s\t%s (p99)\n",
			raw.DurableBytes, lat(r.All.Notify), lat(raw.Durable), ratio(r.All.Notify.P99, raw.Durable.P99))
	}
	fmt.Fprintf(tw, "deploy all → agent checked it and began to fetch, p50 / p99 / max\t%s\t%s\t%s (p99, vs notify + a request)\n",
		lat(r.All.Acted), rawLat(raw.Get), ratio(r.All.Acted.P99, raw.Get.P99))
	fmt.Fprintf(tw, "deploy all → rollout %s\t%.2f s\t-\t\n", r.All.State, r.All.Succeeded)
	fmt.Fprintf(tw, "devices that acted / applies per device\t%d / %.2f\t-\t\n", r.All.Notified, r.All.SwitchesPerDevice)
	fmt.Fprintf(tw, "triggers / desired reads per device\t%.2f / %.2f\t-\t\n", r.All.TriggersPerDevice, r.All.GetsPerDevice)
	fmt.Fprintf(tw, "events / facts stored per device while the rollout ran\t%.2f / %.2f\t-\t\n", r.All.EventsPerDevice, r.All.FactsPerDevice)
	fmt.Fprintf(tw, "coordinator CPU during deploy all\t%.0f%% of a core\t-\t\n", 100*r.All.CPU)
	fmt.Fprintf(tw, "staged deploy (batches %v) → rollout %s\t%.2f s\t-\t\n", r.Staged.Batches, r.Staged.State, r.Staged.Succeeded)
	fmt.Fprintf(tw, "staged: trigger at the agent's socket (all batches) p50 / p99 / max, applies per device\t%s, %.2f\t-\t\n", lat(r.Staged.Notify), r.Staged.SwitchesPerDevice)
	limit := ""
	if r.MemoryLimit != "" {
		limit = " (GOMEMLIMIT " + r.MemoryLimit + ")"
	}
	rawRSS := "-"
	if r.Raw != nil {
		rawRSS = fmt.Sprintf("%d / %d MiB", raw.IdleRSS>>20, raw.PeakRSS>>20)
	}
	fmt.Fprintf(tw, "coordinator RSS idle / peak%s\t%d / %d MiB\t%s\t%s / %s\n", limit, r.IdleRSS>>20, r.PeakRSS>>20, rawRSS,
		ratio(float64(r.IdleRSS), float64(raw.IdleRSS)), ratio(float64(r.PeakRSS), float64(raw.PeakRSS)))
	rawCPU := "-"
	if r.Raw != nil {
		rawCPU = fmt.Sprintf("%.1f%% of a core", 100*raw.IdleCPU)
	}
	fmt.Fprintf(tw, "coordinator CPU idle\t%.1f%% of a core\t%s\t%s\n", 100*r.IdleCPU, rawCPU, ratio(r.IdleCPU, raw.IdleCPU))
	fmt.Fprintf(tw, "fleet-admin status (%d devices, every page)\t%.2f s\t-\t\n", r.StatusN, r.StatusS)
	fmt.Fprintf(tw, "enrol %d devices with one token\t%.1f s, %d retries\t-\t\n", r.Devices, r.EnrollSeconds, r.EnrollRetries)
	fmt.Fprintf(tw, "connect every agent until its first facts are stored\t%.1f s\t-\t\n", r.ConnectSecs)
	fmt.Fprintf(tw, "facts burst (every agent at once), stored\t%.0f facts/s\t-\t\n", r.FactsPS)
	fmt.Fprintf(tw, "agent warnings logged\t%d\t-\t\n", r.Warnings)
	if err := tw.Flush(); err != nil {
		return err
	}
	if r.LastWarn != "" {
		_, err := fmt.Fprintf(w, "\nlast agent warning: %s\n", r.LastWarn)
		return err
	}
	return nil
}
