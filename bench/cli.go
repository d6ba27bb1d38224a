package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/alecthomas/kong"

	"fleet/broker"
)

// CLI is the fleet-bench command line.
type CLI struct {
	Run RunCmd `cmd:"" default:"withargs" help:"Run the bench: a coordinator, N simulated agents, and the raw NATS baseline."`

	Coordinator CoordinatorCmd `cmd:"" hidden:"" help:"Run fleet-coordinator (the bench's own child)."`
	Sim         SimCmd         `cmd:"" hidden:"" help:"Run simulated agents, driven on stdin."`
	RawServer   RawServerCmd   `cmd:"" hidden:"" help:"Run a bare NATS server."`
	RawSim      RawSimCmd      `cmd:"" hidden:"" help:"Run raw NATS connections, driven on stdin."`
}

// RunCmd is `fleet-bench run`.
type RunCmd struct {
	Devices       int           `help:"Simulated devices (real agent loops, each with its own connection)." default:"1000" env:"FLEET_BENCH_DEVICES"`
	PerProcess    int           `help:"Devices per simulator process (keep each under the open-file limit)." default:"2500" env:"FLEET_BENCH_PER_PROCESS"`
	Idle          time.Duration `help:"How long to watch the idle fleet's CPU." default:"60s" env:"FLEET_BENCH_IDLE"`
	FactsInterval time.Duration `help:"The agents' facts interval (fleet-agent's default)." default:"5m" env:"FLEET_BENCH_FACTS_INTERVAL"`
	Dir           string        `help:"Work dir (coordinator data, device state, logs); default: a new temporary dir, removed afterwards." env:"FLEET_BENCH_DIR" type:"path"`
	DeviceDir     string        `help:"Where the simulated devices keep their state; default: a new dir in /dev/shm when there is one (real devices each write to their own disk, not the bench machine's), else under --dir." env:"FLEET_BENCH_DEVICE_DIR" type:"path"`
	NoRaw         bool          `help:"Skip the raw NATS baseline." env:"FLEET_BENCH_NO_RAW"`
	JSON          bool          `help:"Print the figures as JSON." env:"FLEET_BENCH_JSON"`
	MemoryLimit   string        `help:"The coordinator's GOMEMLIMIT (e.g. 900MiB): how its memory and CPU trade at this fleet size." env:"FLEET_BENCH_COORDINATOR_GOMEMLIMIT" placeholder:"SIZE"`
	LogLevel      string        `help:"The coordinator's log level (its log is in --dir)." default:"warn" env:"FLEET_BENCH_LOG_LEVEL"`
	SimNice       int           `help:"The simulator processes' nice value (raw NATS's too): a real device's work runs on its own CPU, not the server's; 0 shares the CPU equally." default:"10" env:"FLEET_BENCH_SIM_NICE"`
	Profiles      bool          `help:"Write the coordinator's CPU profiles (idle, each deploy), its heap profiles (idle, the end of each deploy) and one simulator's CPU profile of each deploy into --dir, for go tool pprof." env:"FLEET_BENCH_PROFILES"`
	DeployProfile time.Duration `help:"With --profiles: how long each deploy's CPU profile runs from the request on (2s shows the batch being written and told alone)." default:"15s" env:"FLEET_BENCH_DEPLOY_PROFILE"`
}

// Run runs the bench and prints its figures.
func (cmd *RunCmd) Run(k *kong.Context) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	dir := cmd.Dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "fleet-bench-"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	devDir := cmd.DeviceDir
	if devDir == "" {
		if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
			if devDir, err = os.MkdirTemp("/dev/shm", "fleet-bench-devices-"); err != nil {
				return err
			}
			defer os.RemoveAll(devDir)
		}
	}
	res, err := Run(ctx, Options{
		DeviceDir: devDir,
		Devices:   cmd.Devices, PerProcess: cmd.PerProcess, Idle: cmd.Idle, FactsInterval: cmd.FactsInterval,
		Dir: dir, Self: self, NoRaw: cmd.NoRaw, Profiles: cmd.Profiles, DeployProfile: cmd.DeployProfile, LogLevel: cmd.LogLevel, MemoryLimit: cmd.MemoryLimit, SimNice: cmd.SimNice, Progress: k.Stderr,
	})
	if err != nil {
		return fmt.Errorf("%w (logs of every process in %s)", err, dir)
	}
	if cmd.JSON {
		enc := json.NewEncoder(k.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	return Print(k.Stdout, res)
}

// CoordinatorCmd runs the coordinator's own command line.
type CoordinatorCmd struct {
	Args []string `arg:"" optional:"" passthrough:""`
}

func (cmd *CoordinatorCmd) Run() error {
	if code := broker.Main(cmd.Args); code != 0 {
		return fmt.Errorf("coordinator exited with %d", code)
	}
	return nil
}

// SimCmd runs a simulator.
type SimCmd struct{}

func (SimCmd) Run() error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	return RunSim(ctx, os.Stdin, os.Stdout)
}

// RawServerCmd runs the baseline's server.
type RawServerCmd struct {
	Port  int    `required:""`
	Store string `help:"JetStream's store directory (the durable baseline writes there)." required:""`
}

func (cmd *RawServerCmd) Run() error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return RunRawServer(ctx, "127.0.0.1", cmd.Port, cmd.Store)
}

// RawSimCmd runs the baseline's connections.
type RawSimCmd struct{}

func (RawSimCmd) Run() error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	return RunRawSim(ctx, os.Stdin, os.Stdout)
}

// Main runs fleet-bench with args and returns the exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	var cli CLI
	parser, err := kong.New(&cli, kong.Name("fleet-bench"),
		kong.Description("Measure a coordinator under a simulated fleet of real agent loops, against raw NATS on the same machine."),
		kong.Writers(stdout, stderr), kong.UsageOnError())
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	k, err := parser.Parse(args)
	if err != nil {
		fmt.Fprintln(stderr, "fleet-bench:", err)
		return 2
	}
	if err := k.Run(); err != nil {
		fmt.Fprintln(stderr, "fleet-bench:", err)
		return 1
	}
	return 0
}
