package broker

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/alecthomas/kong"

	"fleet/accounts"
	"fleet/cliconfig"
	"fleet/logging"
)

// CLI is the fleet-coordinator command line. Every flag can also be set
// from a FLEET_* environment variable or the JSON file named by --config
// (keys are flag names, e.g. {"listen": "0.0.0.0:4222"}).
type CLI struct {
	Config    kong.ConfigFlag `help:"JSON config file; keys are flag names." env:"FLEET_CONFIG" placeholder:"FILE"`
	LogLevel  string          `help:"Log level: debug, info, warn, error." default:"info" env:"FLEET_LOG_LEVEL"`
	LogFormat string          `help:"Log format: auto (console on a terminal, JSON otherwise), json, console." default:"auto" env:"FLEET_LOG_FORMAT"`

	Init    InitCmd    `cmd:"" help:"Create a new fleet's keys and the first owner's credentials in a data dir."`
	Run     RunCmd     `cmd:"" help:"Run the coordinator (initialises an empty data dir first)."`
	Version VersionCmd `cmd:"" help:"Print the version."`

	// Where commands write; kong ignores unexported fields.
	stdout, stderr io.Writer
}

// Version is set at build time (-ldflags "-X fleet/broker.Version=...").
var Version = "dev"

// StoreFlags are the settings init and run share.
type StoreFlags struct {
	DataDir string `help:"Directory for keys, account JWTs and JetStream data." default:"fleet-data" env:"FLEET_DATA_DIR" type:"path"`
	Domain  string `help:"JetStream domain; agents behind leaf nodes reach JetStream through it." default:"fleet" env:"FLEET_DOMAIN"`
}

// InitCmd is `fleet-coordinator init`.
type InitCmd struct {
	StoreFlags
	From string `help:"Copy the identity (operator.jwt, keys/, jwt/, admin.creds) of another coordinator's initialised data dir instead of creating a new fleet: for the other coordinators of a cluster." type:"path" placeholder:"DIR"`
}

// RunCmd is `fleet-coordinator run`.
type RunCmd struct {
	StoreFlags
	Listen          string        `help:"Address for NATS clients (agents, admins)." default:"0.0.0.0:4222" env:"FLEET_LISTEN"`
	HTTP            string        `name:"http" help:"Address for /healthz, /readyz, /metrics (no auth: keep it on loopback) and /api/v1 (bearer token); empty disables." default:"127.0.0.1:9465" env:"FLEET_HTTP"`
	LeafnodeListen  string        `help:"Address for remote sites' leaf nodes; empty disables." env:"FLEET_LEAFNODE_LISTEN"`
	ServerName      string        `help:"Server name (unique in a cluster, required with --cluster-listen); default: generated." env:"FLEET_SERVER_NAME"`
	ClusterName     string        `help:"Cluster name, the same on every coordinator of the cluster." default:"fleet" env:"FLEET_CLUSTER_NAME"`
	ClusterListen   string        `help:"Address for routes from the other coordinators (host:port); empty runs alone." env:"FLEET_CLUSTER_LISTEN"`
	Routes          []string      `help:"The other coordinators' cluster addresses, nats-route://host:port (repeat or comma-separate)." env:"FLEET_ROUTES" placeholder:"URL"`
	Replicas        int           `help:"Replicas of each stream and bucket: 1 alone, 3 or 5 in a cluster; default: 1 alone, 3 with --cluster-listen." env:"FLEET_REPLICAS"`
	FactsRetention  time.Duration `help:"How long fact reports are kept." default:"720h" env:"FLEET_FACTS_RETENTION"`
	FactsHistory    int64         `help:"Fact reports kept per device." default:"1440" env:"FLEET_FACTS_HISTORY"`
	EventsRetention time.Duration `help:"How long device events are kept." default:"2160h" env:"FLEET_EVENTS_RETENTION"`
	StorageGiB      int64         `name:"storage-gib" help:"JetStream disk the fleet's state may use, in GiB: facts and events get 35% each, the audit 15% (the oldest go first when full; fleet_jetstream_stream_bytes warns before)." default:"20" env:"FLEET_STORAGE_GIB"`
	Pprof           bool          `help:"Serve Go's runtime profiles under /debug/pprof/ on --http (for performance work; keep --http on loopback)." env:"FLEET_PPROF"`
	APITokenFile    string        `help:"File holding the bearer token for /api/v1/devices and /api/v1/rollouts; unset, they answer 403." env:"FLEET_API_TOKEN_FILE" type:"path" placeholder:"FILE"`
}

func (s StoreFlags) config() Config {
	c := DefaultConfig()
	c.DataDir = s.DataDir
	c.Domain = s.Domain
	return c
}

// Run initialises the data dir.
func (cmd *InitCmd) Run(cli *CLI) error {
	cfg := cmd.config()
	if accounts.Initialized(cfg.DataDir) {
		return fmt.Errorf("%s is already initialised (its %s exists); nothing was changed", cfg.DataDir, accounts.OperatorJWTFile)
	}
	if cmd.From != "" {
		if err := cfg.Validate(); err != nil {
			return err
		}
		if err := accounts.CopyIdentity(cmd.From, cfg.DataDir); err != nil {
			return err
		}
		a, err := accounts.Load(cfg.DataDir, cfg.Domain, cfg.Limits)
		if err != nil {
			return err
		}
		fmt.Fprintf(cli.stdout, "Copied the fleet identity of %s to %s\n", cmd.From, cfg.DataDir)
		fmt.Fprintf(cli.stdout, "  operator:     %s\n", a.OperatorPublicKey())
		fmt.Fprintf(cli.stdout, "  account:      %s (FLEET)\n", a.FleetAccount())
		fmt.Fprintf(cli.stdout, "Run it with its own --server-name, --cluster-listen and --routes to the other coordinators.\n")
		return nil
	}
	a, err := Init(cfg)
	if err != nil {
		return err
	}
	printInit(cli.stdout, cfg, a)
	return nil
}

func printInit(w io.Writer, cfg Config, a *accounts.Authority) {
	fmt.Fprintf(w, "Initialised fleet in %s\n", cfg.DataDir)
	fmt.Fprintf(w, "  operator:     %s\n", a.OperatorPublicKey())
	fmt.Fprintf(w, "  account:      %s (FLEET)\n", a.FleetAccount())
	fmt.Fprintf(w, "  owner creds:  %s\n", filepath.Join(cfg.DataDir, accounts.AdminCredsFile))
	fmt.Fprintf(w, "The operator's identity seed is in %s.\n", filepath.Join(cfg.DataDir, accounts.OperatorSeedFile))
	fmt.Fprintf(w, "The coordinator does not need it to run: move it offline (and keep a backup).\n")
}

// Run runs the coordinator until SIGINT or SIGTERM.
func (cmd *RunCmd) Run(cli *CLI) error {
	log, err := logging.New(cli.stderr, cli.LogLevel, cli.LogFormat)
	if err != nil {
		return err
	}
	cfg := cmd.config()
	cfg.Listen = cmd.Listen
	cfg.HTTP = cmd.HTTP
	cfg.LeafnodeListen = cmd.LeafnodeListen
	cfg.ServerName = cmd.ServerName
	cfg.ClusterName = cmd.ClusterName
	cfg.ClusterListen = cmd.ClusterListen
	cfg.Routes = cmd.Routes
	cfg.Replicas = cmd.Replicas
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
		if cfg.Clustered() {
			cfg.Replicas = 3
		}
	}
	cfg.FactsRetention = cmd.FactsRetention
	cfg.FactsHistory = cmd.FactsHistory
	cfg.EventsRetention = cmd.EventsRetention
	cfg.Limits.JetStreamDisk = cmd.StorageGiB << 30
	cfg.APITokenFile = cmd.APITokenFile
	cfg.Pprof = cmd.Pprof

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fresh := !accounts.Initialized(cfg.DataDir)
	c, err := Start(ctx, cfg, log)
	if err != nil {
		return err
	}
	if fresh {
		printInit(cli.stdout, cfg, c.Authority())
	}
	printNextSteps(cli.stdout, c)
	log.Info().Str("clients", c.ClientAddr()).Str("http", c.HTTPAddr()).Str("domain", cfg.Domain).Msg("coordinator ready")
	<-c.Done()
	log.Info().Msg("coordinator stopped")
	return nil
}

func printNextSteps(w io.Writer, c *Coordinator) {
	cfg := c.Config()
	creds, _ := filepath.Abs(filepath.Join(cfg.DataDir, accounts.AdminCredsFile))
	// The address actually listened on (--listen may say port 0); a
	// wildcard host is reached on loopback from this machine.
	addr := c.Server().Addr().(*net.TCPAddr)
	host := addr.IP.String()
	if addr.IP.IsUnspecified() {
		host = "127.0.0.1"
	}
	url := "nats://" + net.JoinHostPort(host, fmt.Sprint(addr.Port))
	owner := "<owner key>"
	if cr, err := accounts.ReadCreds(creds); err == nil {
		owner = cr.PublicKey()
	}
	fmt.Fprintf(w, "\nfleet coordinator ready: NATS on %s, JetStream domain %q", c.ClientAddr(), cfg.Domain)
	if a := c.HTTPAddr(); a != "" {
		fmt.Fprintf(w, ", health on http://%s/readyz", a)
	}
	fmt.Fprintf(w, "\nOwner credentials: %s (key %s)\n\nNext steps (go tool task build puts fleet-admin and fleet-agent in ./bin):\n", creds, owner)
	fmt.Fprintf(w, "  export FLEET_SERVER=%s FLEET_CREDS=%s\n", url, creds)
	fmt.Fprintf(w, "  fleet-admin token create --group developers --uses 10 --ttl 24h > enroll-token\n")
	fmt.Fprintf(w, "  # on each device (NixOS: services.fleet-agent), with the token file copied there:\n")
	fmt.Fprintf(w, "  fleet-agent run --server nats://<this-host>:%d --enroll-token-file enroll-token --release-signer %s\n", addr.Port, owner)
	fmt.Fprintf(w, "  fleet-admin devices ls\n")
	fmt.Fprintf(w, "  fleet-admin release create --name v1 --default /nix/store/...   # or --flake .#nixosConfigurations --hosts ...\n")
	fmt.Fprintf(w, "  fleet-admin deploy --release v1 --group developers --strategy canary --wait\n\n")
}

// Run prints the version.
func (VersionCmd) Run(cli *CLI) error {
	fmt.Fprintln(cli.stdout, Version)
	return nil
}

// VersionCmd is `fleet-coordinator version`.
type VersionCmd struct{}

// Main parses args and runs the chosen command; it returns the exit code.
func Main(args []string) int { return run(args, os.Stdout, os.Stderr) }

// exitRequest carries kong's exit (after --help) out of the parser, so Main
// returns the code instead of ending the process.
type exitRequest int

func run(args []string, stdout, stderr io.Writer) (code int) {
	cli := CLI{stdout: stdout, stderr: stderr}
	defer func() {
		if r := recover(); r != nil {
			c, ok := r.(exitRequest)
			if !ok {
				panic(r)
			}
			code = int(c)
		}
	}()
	parser, err := kong.New(&cli,
		kong.Name("fleet-coordinator"),
		kong.Description("The fleet coordinator: an embedded NATS JetStream server that holds the fleet's releases, desired generations, facts and events."),
		kong.Configuration(cliconfig.Loader()),
		kong.UsageOnError(),
		kong.Writers(stdout, stderr),
		kong.Exit(func(c int) { panic(exitRequest(c)) }),
	)
	if err != nil {
		fmt.Fprintln(stderr, "fleet-coordinator:", err)
		return 2
	}
	kctx, err := parser.Parse(args)
	if err != nil {
		fmt.Fprintln(stderr, "fleet-coordinator:", err)
		return 2
	}
	if err := kctx.Run(&cli); err != nil {
		fmt.Fprintln(stderr, "fleet-coordinator:", err)
		return 1
	}
	return 0
}
