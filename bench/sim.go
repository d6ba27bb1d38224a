package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/agent"
	"fleet/model"
	"fleet/subjects"
)

// A simulator process runs many real agent loops (the agent package, each
// with its own connection, state dir and key) whose only stand-in is the
// activator: it "fetches" and "switches" at once and notes when. The
// driver speaks to it in JSON lines on stdin and stdout.

// simConfig is the first line a simulator reads.
type simConfig struct {
	Servers       []string      `json:"servers"`
	Dir           string        `json:"dir"`
	First         int           `json:"first"`
	Count         int           `json:"count"`
	Token         string        `json:"token"`
	Signer        string        `json:"signer"`
	FactsInterval time.Duration `json:"facts_interval"`
	Gen0          string        `json:"gen0"`
	// Nice is the simulator's nice value (see Options.SimNice).
	Nice int `json:"nice,omitempty"`
}

// simCmd is a driver's command; simReply a simulator's answer.
type simCmd struct {
	Op string `json:"op"` // enroll, start, facts, collect, profile, stop
	// Path is the store path to collect, or the file a CPU profile goes
	// to (profile: empty stops it).
	Path string `json:"path,omitempty"`
}

type simReply struct {
	Op    string `json:"op"`
	Error string `json:"error,omitempty"`
	// enroll
	Enrolled int           `json:"enrolled,omitempty"`
	Retries  int64         `json:"retries,omitempty"`
	Took     time.Duration `json:"took,omitempty"`
	// collect: per device, when its agent first fetched Path (Unix ns, 0
	// never) and how many times it switched to it.
	Fetched  []int64 `json:"fetched,omitempty"`
	Switches []int   `json:"switches,omitempty"`
	// Received is when each trigger (raw: each notify) arrived.
	Received []int64 `json:"received,omitempty"`
	// raw collect: when each connection's reply to its request arrived.
	Answered []int64 `json:"answered,omitempty"`
	Warnings int64   `json:"warnings,omitempty"`
	LastWarn string  `json:"last_warn,omitempty"`
}

// instant is the simulator's activator: every store path is there at once
// and switching takes no time. It notes the first fetch of each path (the
// moment the agent acted on its desired state) and each switch.
type instant struct {
	mu       sync.Mutex
	current  string
	fetched  map[string]int64
	switches map[string]int
	// received is when a trigger carrying each path first arrived on the
	// device's connection (before the agent's own checks).
	received map[string]int64
}

func newInstant(gen0 string) *instant {
	return &instant{current: gen0, fetched: map[string]int64{}, switches: map[string]int{}, received: map[string]int64{}}
}

// onTrigger notes when a trigger first brought each store path: at is
// when its bytes reached the device's socket (see stampConn), before the
// agent's own checks.
func (a *instant) onTrigger(at time.Time, payload []byte) {
	var r model.DesiredReply
	var d model.Desired
	if json.Unmarshal(payload, &r) != nil || json.Unmarshal(r.Desired, &d) != nil || d.StorePath == "" {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.received[d.StorePath]; !ok {
		a.received[d.StorePath] = at.UnixNano()
	}
}

func (a *instant) Current(context.Context) (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.current, nil
}

func (a *instant) Fetch(_ context.Context, path, _ string) error {
	now := time.Now().UnixNano()
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.fetched[path]; !ok {
		a.fetched[path] = now
	}
	return nil
}

func (a *instant) Snapshot(context.Context) (agent.Generation, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return agent.Generation{System: a.current, Profile: a.current}, nil
}

func (a *instant) Switch(_ context.Context, path string, _ model.Action) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.current = path
	a.switches[path]++
	return nil
}

func (a *instant) Rollback(_ context.Context, to agent.Generation, _ model.Action) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.current = to.System
	return nil
}

func (a *instant) Active(_ context.Context, path string, _ model.Action) (bool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.current == path, nil
}

func (a *instant) facts(_ context.Context, f *model.Facts) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	f.CurrentSystem, f.BootedSystem = a.current, a.current
	f.NixOSVersion = "25.11"
	f.Mounts = []model.Mount{{Path: "/", FSType: "ext4", SizeBytes: 100 << 30, UsedBytes: 40 << 30}}
	return nil
}

// warnCounter counts the agents' warnings (enrolment retries among them)
// and keeps the last.
type warnCounter struct {
	n, retries atomic.Int64
	mu         sync.Mutex
	last       string
}

func (w *warnCounter) Write(p []byte) (int, error) {
	w.n.Add(1)
	if bytes.Contains(p, []byte("enrollment failed; retrying")) {
		w.retries.Add(1)
	}
	w.mu.Lock()
	w.last = strings.TrimSpace(string(p))
	w.mu.Unlock()
	return len(p), nil
}

type simDevice struct {
	host  string
	dir   string
	act   *instant
	creds *accounts.Creds
	ag    *agent.Agent
	nc    *nats.Conn
}

// RunSim is a simulator process: it reads its config and then commands
// from in, and answers on out, until stop or the end of in.
func RunSim(ctx context.Context, in io.Reader, out io.Writer) error {
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	if !sc.Scan() {
		return fmt.Errorf("simulator: no config on stdin")
	}
	var cfg simConfig
	if err := json.Unmarshal(sc.Bytes(), &cfg); err != nil {
		return fmt.Errorf("simulator config: %w", err)
	}
	if err := renice(cfg.Nice); err != nil {
		return err
	}
	warns := &warnCounter{}
	log := zerolog.New(warns).Level(zerolog.WarnLevel)
	devs := make([]*simDevice, cfg.Count)
	for i := range devs {
		n := cfg.First + i
		devs[i] = &simDevice{host: fmt.Sprintf("bench-%05d", n), dir: filepath.Join(cfg.Dir, fmt.Sprintf("dev-%05d", n)), act: newInstant(cfg.Gen0)}
	}
	enc := json.NewEncoder(out)
	reply := func(r simReply) error {
		r.Warnings = warns.n.Load()
		warns.mu.Lock()
		r.LastWarn = warns.last
		warns.mu.Unlock()
		return enc.Encode(r)
	}
	runCtx, stopAgents := context.WithCancel(ctx)
	defer stopAgents()
	var running sync.WaitGroup
	defer running.Wait()
	var profiling *os.File

	for sc.Scan() {
		var c simCmd
		if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
			return fmt.Errorf("simulator command: %w", err)
		}
		r := simReply{Op: c.Op}
		switch c.Op {
		case "enroll":
			start := time.Now()
			n, err := enrollAll(ctx, cfg, devs, log)
			r.Enrolled, r.Took, r.Retries = n, time.Since(start), warns.retries.Load()
			if err != nil {
				r.Error = err.Error()
			}
		case "start":
			if err := startAll(ctx, runCtx, &running, cfg, devs, log); err != nil {
				r.Error = err.Error()
			}
		case "facts":
			// Each agent's report is acknowledged by the coordinator once
			// stored: the burst is in when every connection has received
			// one more message than before (an idle agent gets nothing
			// else).
			before := make([]uint64, len(devs))
			for i, d := range devs {
				if d.nc != nil {
					before[i] = d.nc.Stats().InMsgs
				}
			}
			start := time.Now()
			for _, d := range devs {
				if d.ag != nil {
					d.ag.RefreshFacts()
				}
			}
			deadline := start.Add(5 * time.Minute)
			for i := 0; i < len(devs); {
				d := devs[i]
				if d.nc == nil || d.nc.Stats().InMsgs > before[i] {
					i++
					continue
				}
				if time.Now().After(deadline) {
					r.Error = d.host + ": no acknowledgement of its facts within 5 minutes"
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
			r.Took = time.Since(start)
		case "collect":
			r.Fetched = make([]int64, len(devs))
			r.Received = make([]int64, len(devs))
			r.Switches = make([]int, len(devs))
			for i, d := range devs {
				d.act.mu.Lock()
				r.Fetched[i] = d.act.fetched[c.Path]
				r.Received[i] = d.act.received[c.Path]
				r.Switches[i] = d.act.switches[c.Path]
				d.act.mu.Unlock()
			}
		case "profile":
			if err := profileCPU(c.Path, &profiling); err != nil {
				r.Error = err.Error()
			}
		case "stop":
			_ = profileCPU("", &profiling)
			stopAgents()
			running.Wait()
			for _, d := range devs {
				if d.nc != nil {
					d.nc.Close()
				}
			}
			return reply(r)
		default:
			r.Error = "unknown command " + c.Op
		}
		if err := reply(r); err != nil {
			return err
		}
	}
	return sc.Err()
}

// profileCPU starts a CPU profile of this simulator into path, or stops
// the one running when path is empty.
func profileCPU(path string, f **os.File) error {
	if *f != nil {
		pprof.StopCPUProfile()
		err := (*f).Close()
		*f = nil
		if err != nil {
			return fmt.Errorf("cpu profile: %w", err)
		}
	}
	if path == "" {
		return nil
	}
	out, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("cpu profile: %w", err)
	}
	if err := pprof.StartCPUProfile(out); err != nil {
		out.Close()
		return fmt.Errorf("cpu profile: %w", err)
	}
	*f = out
	return nil
}

// enrollAll enrols every device with the token, a few at a time as a
// fleet being installed would.
func enrollAll(ctx context.Context, cfg simConfig, devs []*simDevice, log zerolog.Logger) (int, error) {
	var (
		next    atomic.Int64
		done    atomic.Int64
		errMu   sync.Mutex
		lastErr error
		wg      sync.WaitGroup
	)
	for range 16 {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= len(devs) {
					return
				}
				d := devs[i]
				if err := os.MkdirAll(d.dir, 0o700); err != nil {
					errMu.Lock()
					lastErr = err
					errMu.Unlock()
					continue
				}
				ectx, cancel := context.WithTimeout(ctx, 5*time.Minute)
				c, err := agent.Enroll(ectx, agent.EnrollOptions{Servers: cfg.Servers, StateDir: d.dir, Token: cfg.Token, Hostname: d.host, Log: log})
				cancel()
				if err != nil {
					errMu.Lock()
					lastErr = fmt.Errorf("%s: %w", d.host, err)
					errMu.Unlock()
					continue
				}
				d.creds = c
				done.Add(1)
			}
		})
	}
	wg.Wait()
	return int(done.Load()), lastErr
}

// startAll connects every enrolled device and runs its agent loop; it
// returns once every connection is up.
func startAll(ctx, runCtx context.Context, running *sync.WaitGroup, cfg simConfig, devs []*simDevice, log zerolog.Logger) error {
	for _, d := range devs {
		if d.creds == nil {
			continue
		}
		ag, err := agent.New(agent.Options{
			DeviceID: d.creds.PublicKey(), Key: d.creds.Key, Site: d.creds.Site(), Hostname: d.host, StateDir: d.dir,
			ReleaseSigners: []string{cfg.Signer}, Activator: d.act,
			HealthDeadline: time.Minute, ReconnectWithin: time.Minute, ApplyTimeout: time.Minute,
			FactsInterval: cfg.FactsInterval, Recheck: 15 * time.Minute,
			Facts: []agent.FactSource{agent.FactSourceFunc{N: "bench", F: d.act.facts}},
			Log:   log,
		})
		if err != nil {
			return err
		}
		notify := subjects.DeviceNotify(d.creds.Site(), d.creds.PublicKey())
		nc, err := agent.Connect(ctx, d.creds, agent.ConnOptions{
			Servers: cfg.Servers, Name: "fleet-bench " + d.host, Log: log, OnConnect: ag.OnConnect,
			WrapConn: func(c net.Conn) net.Conn { return stampedConn(c, notify, d.act.onTrigger) },
		})
		if err != nil {
			return err
		}
		d.ag, d.nc = ag, nc
		running.Go(func() { _ = ag.Run(runCtx, nc) })
	}
	deadline := time.Now().Add(5 * time.Minute)
	for _, d := range devs {
		for d.nc != nil && !d.nc.IsConnected() {
			if time.Now().After(deadline) {
				return fmt.Errorf("%s did not connect within 5 minutes", d.host)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return nil
}

// storePath makes a valid-looking store path for name: the simulated
// devices never look inside.
func storePath(name string) string {
	const alphabet = "0123456789abcdfghijklmnpqrsvwxyz" // Nix's base32
	h := sha256.Sum256([]byte(name))
	var b strings.Builder
	for i := range 32 {
		b.WriteByte(alphabet[h[i]%32])
	}
	return "/nix/store/" + b.String() + "-" + name
}
