package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	"fleet/internal/promvalue"
)

// This file holds what the driver knows of the processes it starts: their
// CPU time and memory from /proc, and the coordinator's /metrics.

// clockTicks is USER_HZ, the unit of /proc/PID/stat's CPU times: 100 on
// every Linux architecture Go supports.
const clockTicks = 100

// procStat is a process's CPU time and memory at one moment.
type procStat struct {
	At    time.Time
	State string        // stat(5)'s state: R, S, D, Z (a zombie, not yet reaped), ...
	CPU   time.Duration // user + system
	RSS   int64         // bytes resident now
	HWM   int64         // peak resident bytes since the process started
}

func readProc(pid int) (procStat, error) {
	st := procStat{At: time.Now()}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return st, err
	}
	// The command name may hold spaces: fields count from after its ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return st, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return st, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	// Fields 14 and 15 of stat(5); f[0] is field 3, the state.
	st.State = f[0]
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	st.CPU = time.Duration(ut+stime) * time.Second / clockTicks
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return st, err
	}
	sc := bufio.NewScanner(bytes.NewReader(s))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmRSS":
			st.RSS = kb << 10
		case "VmHWM":
			st.HWM = kb << 10
		}
	}
	return st, nil
}

// cpuShare is the CPU a process used between two samples, as a fraction
// of one core.
func cpuShare(a, b procStat) float64 {
	wall := b.At.Sub(a.At)
	if wall <= 0 {
		return 0
	}
	return float64(b.CPU-a.CPU) / float64(wall)
}

// loadAvg is the machine's 1-minute load average (the bench's noise).
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// scrape reads a /metrics page, for promvalue.Get.
func scrape(ctx context.Context, url string) (prometheus.Gatherer, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s", url, resp.Status)
	}
	dec := expfmt.NewDecoder(resp.Body, expfmt.NewFormat(expfmt.TypeTextPlain))
	var fams []*dto.MetricFamily
	for {
		mf := &dto.MetricFamily{}
		if err := dec.Decode(mf); err != nil {
			if errors.Is(err, io.EOF) {
				return prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) { return fams, nil }), nil
			}
			return nil, fmt.Errorf("%s: %w", url, err)
		}
		fams = append(fams, mf)
	}
}

// metric is one series' value on the coordinator's /metrics (0 when
// absent).
func metric(ctx context.Context, url, name string, labels map[string]string) (float64, error) {
	g, err := scrape(ctx, url)
	if err != nil {
		return 0, err
	}
	v, _, err := promvalue.Get(g, name, labels)
	return v, err
}

// deviceMessages is fleet_device_messages_total by kind, from one scrape
// (with a series per device, a scrape of /metrics is not free).
func deviceMessages(ctx context.Context, url string) (map[string]float64, error) {
	g, err := scrape(ctx, url)
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, kind := range []string{"trigger", "desired", "events", "facts"} {
		v, _, err := promvalue.Get(g, "fleet_device_messages_total", map[string]string{"kind": kind})
		if err != nil {
			return nil, err
		}
		out[kind] = v
	}
	return out, nil
}

// running reports whether process pid still runs (not gone, not a zombie
// waiting to be reaped).
func running(pid int) bool {
	st, err := readProc(pid)
	return err == nil && st.State != "Z" && st.State != "X"
}

// startProc starts a child that dies with the driver's context; its
// stderr goes to logFile.
func startProc(ctx context.Context, logFile string, env []string, name string, args ...string) (*exec.Cmd, error) {
	lf, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = lf
	cmd.Stdout = lf
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() { _ = cmd.Wait(); lf.Close() }()
	return cmd, nil
}

// renice sets every thread of this process to nice (threads started later
// inherit it from the one that starts them). On Linux a nice value is a
// thread's, not the process's: setpriority on the pid alone would leave
// the Go runtime's other threads where they were.
func renice(nice int) error {
	if nice == 0 {
		return nil
	}
	// Twice: a thread started while the first pass ran may have copied
	// its value from a thread not yet reniced.
	for range 2 {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return fmt.Errorf("renice: %w", err)
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			if err := syscall.Setpriority(syscall.PRIO_PROCESS, tid, nice); err != nil {
				return fmt.Errorf("renice thread %d to %d: %w", tid, nice, err)
			}
		}
	}
	return nil
}
