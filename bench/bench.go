// Package bench measures a coordinator under a simulated fleet: a
// coordinator process with a fresh data dir, simulator processes running
// real agent loops (only Nix activation is instant), and in the same run a
// bare NATS server with as many connections, for the ratios.
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"fleet/accounts"
	"fleet/admin"
	"fleet/model"
	"fleet/subjects"

	"github.com/nats-io/nkeys"
)

// Options are one bench run's settings.
type Options struct {
	Devices    int
	PerProcess int
	// Idle is how long the idle fleet is watched for CPU.
	Idle time.Duration
	// FactsInterval is the agents' facts interval (5m by default, as
	// fleet-agent's).
	FactsInterval time.Duration
	Dir           string
	// DeviceDir holds the simulated devices' state dirs (default: under
	// Dir). Each real device writes its state to its own disk; thousands
	// sharing the bench machine's disk with the coordinator would measure
	// that disk, so the CLI puts them in memory (/dev/shm) when it can.
	DeviceDir string
	// Self is the fleet-bench executable, run again as coordinator and
	// simulators.
	Self string
	// NoRaw skips the raw NATS baseline.
	NoRaw bool
	// Profiles writes the coordinator's CPU profiles (idle, deploy all)
	// and heap profiles (idle, the end of each deploy) into Dir.
	Profiles bool
	// DeployProfile is how long each deploy's CPU profile runs, from the
	// request on (0: 15 s, the whole rollout; 1–2 s: the write window).
	DeployProfile time.Duration
	// LogLevel is the coordinator's (warn by default).
	LogLevel string
	// MemoryLimit is the coordinator's GOMEMLIMIT ("": none).
	MemoryLimit string
	// SimNice is the simulators' nice value. The simulated devices' work
	// (checking and applying a desired state, signing reports) runs on
	// each device's own CPU in a real fleet; here it shares two cores
	// with the server it is measured against, and at equal priority it
	// takes the CPU the server needs to tell the rest of the fleet. Raw
	// NATS's simulators run at the same value.
	SimNice int
	// Progress receives a line per phase.
	Progress io.Writer
}

// Latency is a distribution in seconds.
type Latency struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50_s"`
	P99 float64 `json:"p99_s"`
	Max float64 `json:"max_s"`
}

func latency(ds []time.Duration) Latency {
	if len(ds) == 0 {
		return Latency{}
	}
	slices.Sort(ds)
	at := func(q float64) float64 { return ds[min(len(ds)-1, int(q*float64(len(ds))))].Seconds() }
	return Latency{N: len(ds), P50: at(0.50), P99: at(0.99), Max: ds[len(ds)-1].Seconds()}
}

// Rollout is one deploy's figures.
type Rollout struct {
	Strategy string `json:"strategy"`
	Batches  []int  `json:"batches"`
	// Notify is deploy → the trigger carrying the new state arrived at
	// the agent; Acted, → the agent had checked it and began to fetch.
	Notify Latency `json:"notify"`
	Acted  Latency `json:"acted"`
	// Succeeded is deploy → the rollout's state succeeded, in seconds.
	Succeeded float64 `json:"succeeded_s"`
	State     string  `json:"state"`
	// Notified counts devices that acted on the desired state; Switches is
	// applies per device (1: the desired state arrived once).
	Notified          int     `json:"notified"`
	SwitchesPerDevice float64 `json:"switches_per_device"`
	TriggersPerDevice float64 `json:"triggers_per_device"`
	GetsPerDevice     float64 `json:"gets_per_device"`
	// EventsPerDevice and FactsPerDevice are the reports the coordinator
	// stored from deploy to the rollout's end.
	EventsPerDevice float64 `json:"events_per_device"`
	FactsPerDevice  float64 `json:"facts_per_device"`
	CPU             float64 `json:"coordinator_cpu_cores"`
}

// Result is a run's figures.
type Result struct {
	Devices     int       `json:"devices"`
	MemoryLimit string    `json:"coordinator_gomemlimit,omitempty"`
	Processes   int       `json:"sim_processes"`
	SimNice     int       `json:"sim_nice"`
	LoadStart   float64   `json:"load_avg_start"`
	LoadEnd     float64   `json:"load_avg_end"`
	Started     time.Time `json:"started"`
	DeviceDir   string    `json:"device_dir"`

	EnrollSeconds float64 `json:"enroll_s"`
	EnrollRetries int64   `json:"enroll_retries"`
	ConnectSecs   float64 `json:"connect_s"`

	IdleRSS  int64   `json:"idle_rss_bytes"`
	PeakRSS  int64   `json:"peak_rss_bytes"`
	IdleCPU  float64 `json:"idle_cpu_cores"`
	StatusS  float64 `json:"status_s"`
	StatusN  int     `json:"status_devices"`
	All      Rollout `json:"deploy_all"`
	Staged   Rollout `json:"deploy_staged"`
	FactsPS  float64 `json:"facts_burst_per_s"`
	Warnings int64   `json:"agent_warnings"`
	LastWarn string  `json:"last_agent_warning,omitempty"`

	Raw *RawResult `json:"raw,omitempty"`
}

// RawResult is the baseline's figures.
type RawResult struct {
	Notify  Latency `json:"notify"`
	Get     Latency `json:"notify_and_request"`
	IdleRSS int64   `json:"idle_rss_bytes"`
	// PeakRSS is the bare server's high-water mark once every connection
	// has received its message and sent its request: each connection's
	// two server goroutines then hold the stacks that traffic grew.
	PeakRSS int64   `json:"peak_rss_bytes"`
	IdleCPU float64 `json:"idle_cpu_cores"`
	// Durable is the durable baseline's notify: each connection's state
	// (DurableBytes, a desired state's size) written to a KV bucket on the
	// same bare server, each connection told as its write is acknowledged.
	Durable      Latency `json:"write_then_notify"`
	DurableBytes int     `json:"write_then_notify_value_bytes"`
}

func (o *Options) progress(format string, args ...any) {
	if o.Progress != nil {
		fmt.Fprintf(o.Progress, "%s  "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// sim is a simulator process and its command pipe.
type sim struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *json.Decoder
}

func startSim(ctx context.Context, self, mode, logFile string, cfg simConfig) (*sim, error) {
	cmd := exec.CommandContext(ctx, self, mode)
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	lf, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	cmd.Stderr = lf
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start simulator: %w", err)
	}
	go func() { _ = cmd.Wait(); lf.Close() }()
	s := &sim{cmd: cmd, in: in, out: json.NewDecoder(out)}
	if err := json.NewEncoder(in).Encode(cfg); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *sim) do(c simCmd) (simReply, error) {
	var r simReply
	if err := json.NewEncoder(s.in).Encode(c); err != nil {
		return r, fmt.Errorf("simulator %d: %w", s.cmd.Process.Pid, err)
	}
	if err := s.out.Decode(&r); err != nil {
		return r, fmt.Errorf("simulator %d: %w (see its log)", s.cmd.Process.Pid, err)
	}
	if r.Error != "" {
		return r, fmt.Errorf("simulator %d: %s: %s", s.cmd.Process.Pid, c.Op, r.Error)
	}
	return r, nil
}

// all sends c to every simulator at once and returns their answers in
// order.
func all(sims []*sim, c simCmd) ([]simReply, error) {
	out := make([]simReply, len(sims))
	errs := make([]error, len(sims))
	var wg sync.WaitGroup
	for i, s := range sims {
		wg.Go(func() { out[i], errs[i] = s.do(c) })
	}
	wg.Wait()
	return out, errors.Join(errs...)
}

func stopSims(sims []*sim) {
	_, _ = all(sims, simCmd{Op: "stop"})
	for _, s := range sims {
		_ = s.in.Close()
	}
}

// split cuts n devices into processes of at most per.
func split(n, per int) [][2]int {
	var out [][2]int
	for first := 0; first < n; first += per {
		out = append(out, [2]int{first, min(per, n-first)})
	}
	return out
}

// waitFor polls cond every interval until it holds or the deadline.
func waitFor(ctx context.Context, within, every time.Duration, what string, cond func() (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	for {
		ok, err := cond()
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: not within %s", what, within)
		case <-time.After(every):
		}
	}
}

// Run runs the bench.
func Run(ctx context.Context, o Options) (*Result, error) {
	if o.Devices <= 0 || o.PerProcess <= 0 {
		return nil, errors.New("--devices and --per-process must be positive")
	}
	if o.FactsInterval <= 0 {
		o.FactsInterval = model.FactsInterval
	}
	if o.DeviceDir == "" {
		o.DeviceDir = filepath.Join(o.Dir, "devices")
	}
	res := &Result{Devices: o.Devices, MemoryLimit: o.MemoryLimit, SimNice: o.SimNice, LoadStart: loadAvg(), Started: time.Now().UTC(), DeviceDir: o.DeviceDir}
	if !o.NoRaw {
		raw, err := runRaw(ctx, o)
		if err != nil {
			return nil, fmt.Errorf("raw baseline: %w", err)
		}
		res.Raw = raw
	}
	if err := runFleet(ctx, o, res); err != nil {
		return res, err
	}
	res.LoadEnd = loadAvg()
	return res, nil
}

func runFleet(ctx context.Context, o Options, res *Result) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	port, err := freePort()
	if err != nil {
		return err
	}
	httpPort, err := freePort()
	if err != nil {
		return err
	}
	dataDir := filepath.Join(o.Dir, "coordinator")
	server := "nats://127.0.0.1:" + strconv.Itoa(port)
	metricsURL := "http://127.0.0.1:" + strconv.Itoa(httpPort) + "/metrics"
	o.progress("coordinator: starting on %s (data %s)", server, dataDir)
	if o.LogLevel == "" {
		o.LogLevel = "warn"
	}
	args := append([]string{"coordinator", "--log-level", o.LogLevel, "--log-format", "json", "run",
		"--data-dir", dataDir, "--listen", "127.0.0.1:" + strconv.Itoa(port), "--http", "127.0.0.1:" + strconv.Itoa(httpPort)},
		pprofFlag(o.Profiles)...)
	var env []string
	if o.MemoryLimit != "" {
		env = append(env, "GOMEMLIMIT="+o.MemoryLimit)
	}
	coord, err := startProc(ctx, filepath.Join(o.Dir, "coordinator.log"), env, o.Self, args...)
	if err != nil {
		return err
	}
	pid := coord.Process.Pid
	defer func() {
		_ = coord.Process.Signal(os.Interrupt)
	}()
	if err := waitFor(ctx, 2*time.Minute, 100*time.Millisecond, "coordinator ready", func() (bool, error) {
		resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(httpPort) + "/readyz")
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	}); err != nil {
		return err
	}
	credsPath := filepath.Join(dataDir, "admin.creds")
	cr, err := accounts.ReadCreds(credsPath)
	if err != nil {
		return err
	}
	c, err := admin.DialCreds(ctx, server, cr)
	if err != nil {
		return err
	}
	defer c.Close()
	tok, err := c.CreateToken(ctx, model.TokenCreate{Groups: []string{"bench"}, Uses: o.Devices, TTL: 2 * time.Hour})
	if err != nil {
		return err
	}
	gen0 := storePath("bench-gen0")
	var sims []*sim
	for i, part := range split(o.Devices, o.PerProcess) {
		s, err := startSim(ctx, o.Self, "sim", filepath.Join(o.Dir, fmt.Sprintf("sim-%d.log", i)), simConfig{
			Servers: []string{server}, Dir: o.DeviceDir, First: part[0], Count: part[1],
			Token: tok.Token, Signer: cr.PublicKey(), FactsInterval: o.FactsInterval, Gen0: gen0, Nice: o.SimNice,
		})
		if err != nil {
			return err
		}
		sims = append(sims, s)
	}
	res.Processes = len(sims)
	defer stopSims(sims)

	// Enrolment: one token, every device at once (16 at a time per
	// simulator).
	o.progress("enrol: %d devices over %d simulator processes", o.Devices, len(sims))
	start := time.Now()
	enrolProfiled := o.profile(ctx, httpPort, "enroll-cpu.pb.gz", "profile?seconds=10")
	stopSimProfile, err := o.profileSim(sims[0], "sim0-enroll-cpu.pb.gz")
	if err != nil {
		return err
	}
	replies, err := all(sims, simCmd{Op: "enroll"})
	stopSimProfile()
	<-enrolProfiled
	if err != nil {
		return err
	}
	res.EnrollSeconds = time.Since(start).Seconds()
	for _, r := range replies {
		res.EnrollRetries += r.Retries
	}
	o.progress("enrol: %.1f s, %d retries", res.EnrollSeconds, res.EnrollRetries)

	start = time.Now()
	if _, err := all(sims, simCmd{Op: "start"}); err != nil {
		return err
	}
	if err := waitFor(ctx, 5*time.Minute, 200*time.Millisecond, "every device online", func() (bool, error) {
		v, err := metric(ctx, metricsURL, "fleet_devices_online", nil)
		return int(v) >= o.Devices, err
	}); err != nil {
		return err
	}
	// Each agent reports facts on connect: wait for them, then the fleet
	// is idle.
	if err := waitFor(ctx, 5*time.Minute, 200*time.Millisecond, "first facts of every device", func() (bool, error) {
		v, err := metric(ctx, metricsURL, "fleet_device_messages_total", map[string]string{"kind": "facts"})
		return int(v) >= o.Devices, err
	}); err != nil {
		return err
	}
	res.ConnectSecs = time.Since(start).Seconds()
	o.progress("agents: %d connected and reported in %.1f s; idle for %s", o.Devices, res.ConnectSecs, o.Idle)

	a, err := readProc(pid)
	if err != nil {
		return err
	}
	profiled := o.profile(ctx, httpPort, "idle-cpu.pb.gz", "profile?seconds="+strconv.Itoa(max(1, int(o.Idle.Seconds()))))
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(o.Idle):
	}
	<-profiled
	<-o.profile(ctx, httpPort, "idle-heap.pb.gz", "heap")
	b, err := readProc(pid)
	if err != nil {
		return err
	}
	res.IdleCPU, res.IdleRSS = cpuShare(a, b), b.RSS
	o.progress("idle: %.1f%% of a core, RSS %d MiB", 100*res.IdleCPU, res.IdleRSS>>20)

	// Status, the way fleet-admin reads it (every page).
	var took []time.Duration
	for range 3 {
		t := time.Now()
		rep, err := c.Status(ctx, "")
		if err != nil {
			return err
		}
		took = append(took, time.Since(t))
		res.StatusN = len(rep.Devices)
	}
	slices.Sort(took)
	res.StatusS = took[1].Seconds()
	o.progress("status: %.2f s for %d devices", res.StatusS, res.StatusN)

	deploy := func(name string, req model.DeployRequest) (Rollout, error) {
		r := Rollout{Strategy: req.Strategy}
		rel, signed, err := benchRelease(cr.Key, "bench-"+name)
		if err != nil {
			return r, err
		}
		if err := c.Call(ctx, subjects.VerbReleaseCreate, true, signed, nil); err != nil {
			return r, err
		}
		before, _ := deviceMessages(ctx, metricsURL)
		p0, err := readProc(pid)
		if err != nil {
			return r, err
		}
		req.ReleaseID = rel.ID
		profiled := o.profile(ctx, httpPort, "deploy-"+name+"-cpu.pb.gz", "profile?seconds="+strconv.Itoa(o.deployProfileSeconds()))
		defer func() { <-profiled }()
		if o.Profiles {
			// What the coordinator waits on while the fleet is told.
			time.AfterFunc(3*time.Second, func() { <-o.profile(ctx, httpPort, "deploy-"+name+"-goroutines.txt", "goroutine?debug=1") })
		}
		stopSimProfile, err := o.profileSim(sims[0], "sim0-deploy-"+name+"-cpu.pb.gz")
		if err != nil {
			return r, err
		}
		defer stopSimProfile()
		t0 := time.Now()
		var ro model.Rollout
		if err := c.Call(ctx, subjects.VerbDeploy, true, req, &ro); err != nil {
			return r, err
		}
		r.Batches = ro.BatchSizes
		if err := waitFor(ctx, 10*time.Minute, 50*time.Millisecond, "rollout "+ro.ID+" to finish", func() (bool, error) {
			s, err := c.RolloutSummary(ctx, ro.ID)
			if err != nil {
				return false, err
			}
			r.State = string(s.State)
			return s.State.Finished() || s.State == model.RolloutPaused, nil
		}); err != nil {
			return r, err
		}
		r.Succeeded = time.Since(t0).Seconds()
		// What the heap held at its last collection during the rollout.
		<-o.profile(ctx, httpPort, "deploy-"+name+"-heap.pb.gz", "heap")
		during, _ := deviceMessages(ctx, metricsURL)
		r.EventsPerDevice = (during["events"] - before["events"]) / float64(o.Devices)
		r.FactsPerDevice = (during["facts"] - before["facts"]) / float64(o.Devices)
		p1, err := readProc(pid)
		if err != nil {
			return r, err
		}
		r.CPU = cpuShare(p0, p1)
		// Counted now: a rollout succeeds only after every device reported
		// the apply that its trigger asked for, and the engine sends a
		// batch's triggers before it takes any of the batch's results.
		replies, err := all(sims, simCmd{Op: "collect", Path: rel.Default})
		if err != nil {
			return r, err
		}
		var acted, notified []time.Duration
		switches := 0
		for _, rep := range replies {
			for i, at := range rep.Fetched {
				if at != 0 {
					acted = append(acted, time.Unix(0, at).Sub(t0))
				}
				if rec := rep.Received[i]; rec != 0 {
					notified = append(notified, time.Unix(0, rec).Sub(t0))
				}
				switches += rep.Switches[i]
			}
		}
		r.Notify, r.Acted = latency(notified), latency(acted)
		r.Notified = len(acted)
		r.SwitchesPerDevice = float64(switches) / float64(o.Devices)
		after, _ := deviceMessages(ctx, metricsURL)
		r.TriggersPerDevice = (after["trigger"] - before["trigger"]) / float64(o.Devices)
		r.GetsPerDevice = (after["desired"] - before["desired"]) / float64(o.Devices)
		return r, nil
	}
	o.progress("deploy --strategy all")
	if res.All, err = deploy("all", model.DeployRequest{Group: "bench", Strategy: "all", HealthTimeout: "10m"}); err != nil {
		return err
	}
	o.progress("deploy all: notify p50 %.2f s p99 %.2f s, %s after %.1f s", res.All.Notify.P50, res.All.Notify.P99, res.All.State, res.All.Succeeded)
	o.progress("deploy --strategy staged --batches 25%%,50%%,75%%,100%%")
	if res.Staged, err = deploy("staged", model.DeployRequest{Group: "bench", Strategy: "staged", Batches: "25%,50%,75%,100%", HealthTimeout: "10m"}); err != nil {
		return err
	}
	o.progress("deploy staged: %s after %.1f s", res.Staged.State, res.Staged.Succeeded)

	// A facts burst: every agent reports at once; each simulator says
	// when its agents' reports were all acknowledged (stored).
	replies, err = all(sims, simCmd{Op: "facts"})
	if err != nil {
		return err
	}
	var slowest time.Duration
	for _, r := range replies {
		slowest = max(slowest, r.Took)
	}
	res.FactsPS = float64(o.Devices) / slowest.Seconds()
	o.progress("facts burst: %.0f facts/s stored", res.FactsPS)

	if p, err := readProc(pid); err == nil {
		res.PeakRSS = p.HWM
	}
	replies, _ = all(sims, simCmd{Op: "collect"})
	for _, r := range replies {
		res.Warnings += r.Warnings
		if r.LastWarn != "" {
			res.LastWarn = r.LastWarn
		}
	}
	return nil
}

func (o *Options) deployProfileSeconds() int {
	if o.DeployProfile <= 0 {
		return 15
	}
	return max(1, int(o.DeployProfile.Seconds()))
}

func pprofFlag(on bool) []string {
	if on {
		return []string{"--pprof"}
	}
	return nil
}

// profile fetches one of the coordinator's profiles into Dir in the
// background (when Profiles is set); the channel closes when it is done.
// profileSim writes a CPU profile of simulator s into file in o.Dir, when
// Profiles is set, until stop is called: one simulator's share of the
// machine while the fleet acts.
func (o *Options) profileSim(s *sim, file string) (stop func(), err error) {
	if !o.Profiles {
		return func() {}, nil
	}
	if _, err := s.do(simCmd{Op: "profile", Path: filepath.Join(o.Dir, file)}); err != nil {
		return nil, err
	}
	return func() { _, _ = s.do(simCmd{Op: "profile"}) }, nil
}

func (o *Options) profile(ctx context.Context, httpPort int, file, what string) <-chan struct{} {
	done := make(chan struct{})
	if !o.Profiles {
		close(done)
		return done
	}
	go func() {
		defer close(done)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:"+strconv.Itoa(httpPort)+"/debug/pprof/"+what, nil)
		if err != nil {
			return
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			o.progress("profile %s: %v", file, err)
			return
		}
		defer resp.Body.Close()
		f, err := os.Create(filepath.Join(o.Dir, file))
		if err != nil {
			return
		}
		defer f.Close()
		_, _ = io.Copy(f, resp.Body)
	}()
	return done
}

// runRaw measures the baseline: a bare server, N connections.
func runRaw(ctx context.Context, o Options) (*RawResult, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	url := "nats://127.0.0.1:" + strconv.Itoa(port)
	o.progress("raw: bare nats-server on %s, %d connections", url, o.Devices)
	srv, err := startProc(ctx, filepath.Join(o.Dir, "raw-server.log"), nil, o.Self, "raw-server", "--port", strconv.Itoa(port),
		"--store", filepath.Join(o.Dir, "raw-jetstream"))
	if err != nil {
		return nil, err
	}
	// The baseline's processes are gone before the fleet's part starts:
	// a server closing 10,000 connections would share its CPU.
	pids := []int{srv.Process.Pid}
	defer func() {
		_ = waitFor(context.WithoutCancel(ctx), 30*time.Second, 50*time.Millisecond, "the raw baseline's processes to exit", func() (bool, error) {
			return !slices.ContainsFunc(pids, running), nil
		})
	}()
	defer func() { _ = srv.Process.Signal(os.Interrupt) }()
	if err := waitFor(ctx, time.Minute, 50*time.Millisecond, "raw server", func() (bool, error) {
		conn, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			return false, nil
		}
		conn.Close()
		return true, nil
	}); err != nil {
		return nil, err
	}
	resp, err := natsResponder(url)
	if err != nil {
		return nil, err
	}
	defer resp.Close()
	var sims []*sim
	for i, part := range split(o.Devices, o.PerProcess) {
		s, err := startSim(ctx, o.Self, "raw-sim", filepath.Join(o.Dir, fmt.Sprintf("raw-sim-%d.log", i)),
			simConfig{Servers: []string{url}, First: part[0], Count: part[1], Nice: o.SimNice})
		if err != nil {
			return nil, err
		}
		sims = append(sims, s)
		pids = append(pids, s.cmd.Process.Pid)
	}
	defer stopSims(sims)
	if _, err := all(sims, simCmd{Op: "start"}); err != nil {
		return nil, err
	}
	res := &RawResult{}
	a, err := readProc(srv.Process.Pid)
	if err != nil {
		return nil, err
	}
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(o.Idle):
	}
	b, err := readProc(srv.Process.Pid)
	if err != nil {
		return nil, err
	}
	res.IdleCPU, res.IdleRSS = cpuShare(a, b), b.RSS

	t0 := time.Now()
	if err := resp.notifyAll(o.Devices); err != nil {
		return nil, err
	}
	replies, err := collectWhen(ctx, sims, "every raw connection answered", func(r simReply) bool { return !slices.Contains(r.Answered, 0) })
	if err != nil {
		return nil, err
	}
	var notify, get []time.Duration
	for _, r := range replies {
		for i := range r.Received {
			if r.Received[i] != 0 {
				notify = append(notify, time.Unix(0, r.Received[i]).Sub(t0))
			}
			get = append(get, time.Unix(0, r.Answered[i]).Sub(t0))
		}
	}
	res.Notify, res.Get = latency(notify), latency(get)
	if p, err := readProc(srv.Process.Pid); err == nil {
		res.PeakRSS = p.HWM
	}
	o.progress("raw: notify p50 %.3f s p99 %.3f s; with a request p99 %.3f s; idle %.1f%% of a core, RSS %d / %d MiB",
		res.Notify.P50, res.Notify.P99, res.Get.P99, 100*res.IdleCPU, res.IdleRSS>>20, res.PeakRSS>>20)

	// The durable baseline: each connection's state written, then told.
	value, err := desiredSample()
	if err != nil {
		return nil, err
	}
	if _, err := all(sims, simCmd{Op: "reset"}); err != nil {
		return nil, err
	}
	t1 := time.Now()
	if err := resp.writeThenNotify(ctx, o.Devices, value); err != nil {
		return nil, err
	}
	replies, err = collectWhen(ctx, sims, "every raw connection told of its written state", func(r simReply) bool { return !slices.Contains(r.Received, 0) })
	if err != nil {
		return nil, err
	}
	var durable []time.Duration
	for _, r := range replies {
		for _, at := range r.Received {
			durable = append(durable, time.Unix(0, at).Sub(t1))
		}
	}
	res.Durable, res.DurableBytes = latency(durable), len(value)
	o.progress("raw: written to a KV bucket (%d bytes each), then told: p50 %.3f s p99 %.3f s", len(value), res.Durable.P50, res.Durable.P99)
	return res, nil
}

// collectWhen collects the simulators' replies until every one passes
// done, within 5 minutes.
func collectWhen(ctx context.Context, sims []*sim, what string, done func(simReply) bool) ([]simReply, error) {
	var replies []simReply
	err := waitFor(ctx, 5*time.Minute, 100*time.Millisecond, what, func() (bool, error) {
		var err error
		if replies, err = all(sims, simCmd{Op: "collect"}); err != nil {
			return false, err
		}
		return !slices.ContainsFunc(replies, func(r simReply) bool { return !done(r) }), nil
	})
	return replies, err
}

// benchRelease is the bench's release id: one store path (a name's), a
// switch, signed by kp.
func benchRelease(kp nkeys.KeyPair, id string) (model.Release, model.Signed, error) {
	author, err := kp.PublicKey()
	if err != nil {
		return model.Release{}, model.Signed{}, err
	}
	rel := model.Release{ID: id, Name: id, Default: storePath(id), Action: model.ActionSwitch, CreatedAt: time.Now().UTC(), Author: author}
	signed, err := model.Sign(kp, model.PurposeRelease, rel)
	return rel, signed, err
}

// desiredSample is a desired state the size of those the bench's deploys
// write (a signed release and the signed deploy that asked for it, signed
// here by a key of its own): the durable baseline writes values of its size.
func desiredSample() ([]byte, error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, err
	}
	rel, signed, err := benchRelease(kp, "bench-all")
	if err != nil {
		return nil, err
	}
	now := time.Now().UTC()
	deploy, err := model.SignRequest(kp, subjects.VerbDeploy, model.DeployRequest{ReleaseID: rel.ID, Group: "bench", Strategy: "all", HealthTimeout: "10m"}, now)
	if err != nil {
		return nil, err
	}
	return json.Marshal(model.Desired{Device: rel.Author, ReleaseID: rel.ID, RolloutID: "r20261130-000000-benchraw", StorePath: rel.Default,
		Action: rel.Action, Release: signed, IssuedAt: now, Deploy: &deploy})
}
