// Package agent is the fleet agent that runs on each device: it enrols,
// keeps the device on its desired NixOS generation, runs health checks,
// rolls back on failure and reports facts and events.
package agent

import (
	"fmt"
	"os"
	"time"

	"github.com/alecthomas/kong"

	"fleet/cliconfig"
)

// Version is set at build time (-ldflags "-X fleet/agent.Version=...").
var Version = "dev"

// CLI is the fleet-agent command line. Flags can also be set from FLEET_*
// environment variables and from the JSON file named by --config, whose keys
// are the flag names (it also holds health-checks, see FileConfig).
type CLI struct {
	Config    kong.ConfigFlag `help:"JSON config file; keys are flag names, plus health-checks." env:"FLEET_CONFIG" placeholder:"FILE"`
	LogLevel  string          `help:"Log level: debug, info, warn, error." default:"info" env:"FLEET_LOG_LEVEL"`
	LogFormat string          `help:"Log format: auto, json, console." default:"auto" env:"FLEET_LOG_FORMAT"`

	Run     RunCmd     `cmd:"" help:"Enrol if needed, then keep this device on its desired generation."`
	Facts   FactsCmd   `cmd:"" help:"Print this device's facts as JSON, as the agent reports them."`
	Version VersionCmd `cmd:"" help:"Print the version."`
}

// RunCmd is `fleet-agent run`.
type RunCmd struct {
	Server          []string      `help:"Coordinator or leaf node URL (repeatable)." default:"nats://127.0.0.1:4222" env:"FLEET_SERVER" sep:","`
	StateDir        string        `help:"Directory for the device's keys, creds and apply state." default:"/var/lib/fleet-agent" env:"FLEET_STATE_DIR" type:"path"`
	EnrollToken     string        `help:"Enrollment token (from fleet-admin token create); used once, when the device has no creds." env:"FLEET_ENROLL_TOKEN"`
	EnrollTokenFile string        `help:"File holding the enrollment token." env:"FLEET_ENROLL_TOKEN_FILE" type:"path"`
	ReleaseSigner   []string      `help:"Admin public key trusted to sign releases (repeatable); releases by others are refused." env:"FLEET_RELEASE_SIGNERS" sep:","`
	Hostname        string        `help:"Host name to enrol and select closures with (default: this host's)." env:"FLEET_HOSTNAME"`
	Profile         string        `help:"System profile to set on apply." default:"/nix/var/nix/profiles/system" env:"FLEET_PROFILE"`
	CurrentSystem   string        `help:"Link to the running system." default:"/run/current-system" env:"FLEET_CURRENT_SYSTEM"`
	BootedSystem    string        `help:"Link to the booted system." default:"/run/booted-system" env:"FLEET_BOOTED_SYSTEM"`
	FactsInterval   time.Duration `help:"How often to report facts (with jitter); also at once on a change of system, reboot need, encryption, last apply or the set of mounts (checked every 15s)." default:"5m" env:"FLEET_FACTS_INTERVAL"`
	ReconnectWithin time.Duration `help:"After a switch the agent must reach the coordinator again within this time, or it rolls back." default:"2m" env:"FLEET_RECONNECT_WITHIN"`
	ApplyTimeout    time.Duration `help:"Bound on fetching and switching one generation." default:"30m" env:"FLEET_APPLY_TIMEOUT"`
	Recheck         time.Duration `help:"How often to re-read the desired state (with jitter), in case a change notification was lost." default:"15m" env:"FLEET_RECHECK"`
	ApprovalPoll    time.Duration `help:"While the device waits for approval, how often to ask (with jitter)." default:"30s" env:"FLEET_APPROVAL_POLL"`
	PayloadDir      string        `help:"Where sealed payloads from fleet-admin payload push land." default:"/run/fleet/payloads" env:"FLEET_PAYLOAD_DIR" type:"path"`

	// Recovery-key escrow.
	RecoveryKey map[string]string `help:"LUKS device and its recovery key file to escrow, DISK=FILE (e.g. nvme0n1p2=/var/lib/fleet-agent/recovery-nvme0n1p2; repeatable)." env:"FLEET_RECOVERY_KEYS" mapsep:","`
	EscrowKey   string            `help:"Pin the escrow public key (X...); default: the one an admin trusted by --release-signer recorded." env:"FLEET_ESCROW_KEY"`
}

// FactsCmd is `fleet-agent facts`.
type FactsCmd struct {
	StateDir      string `help:"Directory of the device's creds and apply state (for the device ID and last apply)." default:"/var/lib/fleet-agent" env:"FLEET_STATE_DIR" type:"path"`
	CurrentSystem string `help:"Link to the running system." default:"/run/current-system" env:"FLEET_CURRENT_SYSTEM"`
	BootedSystem  string `help:"Link to the booted system." default:"/run/booted-system" env:"FLEET_BOOTED_SYSTEM"`
	Profile       string `help:"System profile (a generation pending for the next boot means a reboot is needed)." default:"/nix/var/nix/profiles/system" env:"FLEET_PROFILE"`
}

// VersionCmd is `fleet-agent version`.
type VersionCmd struct{}

// Run prints the version.
func (VersionCmd) Run() error {
	fmt.Println(Version)
	return nil
}

// Main parses args and runs the chosen command; it returns the exit code.
func Main(args []string) int {
	var cli CLI
	parser, err := kong.New(&cli, kong.Name("fleet-agent"),
		kong.Description("The fleet agent: keeps this device on its desired NixOS generation and reports its facts."),
		kong.Configuration(cliconfig.Loader("health-checks", "health-deadline")),
		kong.UsageOnError(),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleet-agent:", err)
		return 2
	}
	kctx, err := parser.Parse(args)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleet-agent:", err)
		return 2
	}
	if err := kctx.Run(&cli); err != nil {
		fmt.Fprintln(os.Stderr, "fleet-agent:", err)
		return 1
	}
	return 0
}
