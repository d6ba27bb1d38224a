package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// startPrometheus runs the real Prometheus (Debian's package; CI installs it
// with scripts/test-deps) on a free loopback port, scraping target's
// /metrics every second. It is this test's own process, never a system
// service, and is killed at cleanup.
func startPrometheus(t *testing.T, target string) string {
	t.Helper()
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatal("prometheus is not installed: run scripts/test-deps as root (Debian package prometheus)")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	dir := t.TempDir()
	conf := fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: fleet-coordinator
    scrape_interval: 1s
    scrape_timeout: 900ms
    static_configs:
      - targets: [%q]
`, target)
	cfgPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd := exec.Command(bin,
		"--config.file="+cfgPath,
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr,
		"--log.level=warn",
	)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("prometheus output:\n%s", out.String())
		}
	})
	base := "http://" + addr
	poll.Telling(t, 30*time.Second, "prometheus ready on "+addr, func() (bool, string) {
		select {
		case <-exited:
			t.Fatalf("prometheus exited: %s", out.String())
		default:
		}
		resp, err := http.Get(base + "/-/ready")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == 200, resp.Status
	})
	return base
}

type promSample struct {
	Metric map[string]string `json:"metric"`
	Value  [2]any            `json:"value"`
}

// promQuery runs an instant query against Prometheus' HTTP API.
func promQuery(t *testing.T, base, q string) []promSample {
	t.Helper()
	resp, err := http.Get(base + "/api/v1/query?query=" + url.QueryEscape(q))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			ResultType string       `json:"resultType"`
			Result     []promSample `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatalf("query %s: %v", q, err)
	}
	if r.Status != "success" {
		t.Fatalf("query %s: %s", q, r.Error)
	}
	return r.Data.Result
}

func (s promSample) value() float64 {
	str, _ := s.Value[1].(string)
	v, err := strconv.ParseFloat(str, 64)
	if err != nil {
		return math.NaN()
	}
	return v
}

// A real Prometheus scrapes the coordinator while simulated devices report
// facts; each device's last-seen and generation series arrive with the
// values the devices reported.
func TestPrometheusScrapesCoordinator(t *testing.T) {
	f := startVis(t, false)
	prom := startPrometheus(t, f.c.HTTPAddr())

	type sent struct {
		d    *visDevice
		path string
		at   time.Time
	}
	var devs []sent
	for i := range 4 {
		d := f.addDevice(fmt.Sprintf("host%02d", i), "lab")
		p := storePath(fmt.Sprintf("gen%d", i%2))
		before := time.Now()
		d.facts(t, p, model.Mount{Path: "/", SizeBytes: 1000, UsedBytes: uint64(100 * (i + 1))})
		devs = append(devs, sent{d, p, before})
	}
	// Reports keep coming while Prometheus scrapes.
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	go func() {
		tick := time.NewTicker(300 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				s := devs[0]
				_ = reportSigned(s.d.nc, s.d.key, subjects.DeviceFacts(s.d.id), model.PurposeFacts,
					model.Facts{Device: s.d.id, Time: time.Now(), Hostname: s.d.name, CurrentSystem: s.path})
			}
		}
	}()

	for _, s := range devs {
		poll.Telling(t, 30*time.Second, s.d.name+"'s series in Prometheus", func() (bool, string) {
			gen := promQuery(t, prom, fmt.Sprintf(`fleet_device_generation_info{device=%q}`, s.d.id))
			seen := promQuery(t, prom, fmt.Sprintf(`fleet_device_last_seen_timestamp_seconds{device=%q}`, s.d.id))
			if len(gen) != 1 || len(seen) != 1 {
				return false, fmt.Sprintf("%d generation, %d last-seen series", len(gen), len(seen))
			}
			if gen[0].Metric["store_path"] != s.path || gen[0].Metric["name"] != s.d.name || gen[0].value() != 1 ||
				gen[0].Metric["job"] != "fleet-coordinator" {
				t.Fatalf("%s generation series %+v, want store_path %s", s.d.name, gen[0], s.path)
			}
			ls := seen[0].value()
			lo, hi := float64(s.at.Add(-time.Second).UnixMilli())/1e3, float64(time.Now().Add(time.Second).UnixMilli())/1e3
			if ls < lo || ls > hi {
				t.Fatalf("%s last seen %f, want within [%f, %f]", s.d.name, ls, lo, hi)
			}
			return true, ""
		})
	}
	// Versions in use, as the dashboard asks, and the fleet totals.
	poll.Telling(t, 30*time.Second, "versions in use", func() (bool, string) {
		res := promQuery(t, prom, `count by (store_path) (fleet_device_generation_info)`)
		counts := map[string]float64{}
		for _, r := range res {
			counts[r.Metric["store_path"]] = r.value()
		}
		return counts[storePath("gen0")] == 2 && counts[storePath("gen1")] == 2, fmt.Sprint(counts)
	})
	if r := promQuery(t, prom, `fleet_devices{status="active"}`); len(r) != 1 || r[0].value() != 4 {
		t.Errorf("fleet_devices{status=active}: %+v", r)
	}
	if r := promQuery(t, prom, fmt.Sprintf(`fleet_device_disk_used_ratio{device=%q,mount="/"}`, devs[3].d.id)); len(r) != 1 || r[0].value() != 0.4 {
		t.Errorf("disk used ratio of host03: %+v", r)
	}
	// The device that keeps reporting moves its last-seen forward.
	first := promQuery(t, prom, fmt.Sprintf(`fleet_device_last_seen_timestamp_seconds{device=%q}`, devs[0].d.id))[0].value()
	poll.Telling(t, 30*time.Second, "host00's last seen to advance", func() (bool, string) {
		r := promQuery(t, prom, fmt.Sprintf(`fleet_device_last_seen_timestamp_seconds{device=%q}`, devs[0].d.id))
		return len(r) == 1 && r[0].value() > first+0.5, fmt.Sprint(r)
	})
	if r := promQuery(t, prom, `up{job="fleet-coordinator"}`); len(r) != 1 || r[0].value() != 1 {
		t.Errorf("up: %+v", r)
	}
}
