// Package admin is fleet-admin, the command line for people and CI.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"

	"github.com/alecthomas/kong"
	kongcompletion "github.com/jotaen/kong-completion"
	"github.com/mattn/go-isatty"

	"fleet/cliconfig"
	"fleet/model"
)

// Version is set at build time (-ldflags "-X fleet/admin.Version=...").
var Version = "dev"

// Globals are the flags every command shares. They can also be set from
// FLEET_* environment variables, the JSON file named by --config, or a
// NATS context (--server and --creds only): a flag wins over the
// environment, which wins over the file, which wins over the context.
type Globals struct {
	Config  kong.ConfigFlag `help:"JSON config file; keys are flag names, e.g. {\"server\": \"nats://fleet:4222\"}." env:"FLEET_ADMIN_CONFIG" placeholder:"FILE"`
	Context string          `help:"NATS context (natscli's, e.g. from fleet-admin context save) to take --server and --creds from; default: the one nats context select chose." env:"NATS_CONTEXT" placeholder:"NAME"`
	Server  string          `help:"Coordinator URL (default: the NATS context's, else nats://127.0.0.1:4222)." env:"FLEET_SERVER" placeholder:"URL"`
	Creds   string          `help:"Admin credentials file (the first owner's is DATA_DIR/admin.creds)." env:"FLEET_CREDS" type:"path"`
	JSON    bool            `name:"json" help:"Print JSON instead of tables."`
	Yes     bool            `help:"Do not ask for confirmation (deploy's preview, devices revoke, admin remove, rollout abort and undo); destructive commands need it when stdin is not a terminal." env:"FLEET_YES"`
	Limit   int             `help:"Page size of listings: items one reply carries (0: the coordinator's cap). Commands fetch every page." default:"0"`
	// ShowVersion is --version.
	ShowVersion kong.VersionFlag `name:"version" help:"Print the version and exit."`

	ctx            context.Context
	stdout, stderr io.Writer
	stdin          io.Reader
	stdinTTY       bool
	natsCtx        *natsContext
}

// dial connects with the global flags.
func (g *Globals) dial() (*Client, error) {
	if g.Limit < 0 {
		return nil, fmt.Errorf("--limit must not be negative")
	}
	c, err := Dial(g.ctx, g.Server, g.Creds)
	if err != nil {
		return nil, err
	}
	c.PageSize = g.Limit
	return c, nil
}

// withClient dials, runs fn and closes.
func (g *Globals) withClient(fn func(c *Client) error) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	return fn(c)
}

// call dials the coordinator, sends one signed request and closes.
func (g *Globals) call(verb string, write bool, args, out any) error {
	return g.withClient(func(c *Client) error { return c.Call(g.ctx, verb, write, args, out) })
}

// printList fetches a listing and prints it: JSON with --json, else a
// table of header and one tab-separated row an item.
func printList[T any](g *Globals, fetch func(*Client) ([]T, error), header string, row func(T) string) error {
	var items []T
	if err := g.withClient(func(c *Client) (err error) { items, err = fetch(c); return err }); err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(items)
	}
	tw := newTable(g.stdout)
	fmt.Fprintln(tw, header)
	for _, it := range items {
		fmt.Fprintln(tw, row(it))
	}
	return tw.Flush()
}

// newTable aligns tab-separated columns for the terminal.
func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(cleanWriter{w}, 0, 4, 2, ' ', 0)
}

// cleanWriter drops what a terminal would act on from table output: rows
// show device-supplied text, and a table has no escapes of its own.
type cleanWriter struct{ w io.Writer }

func (c cleanWriter) Write(p []byte) (int, error) {
	if _, err := io.WriteString(c.w, model.CleanText(string(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}

// printJSON writes v as indented JSON.
func (g *Globals) printJSON(v any) error {
	enc := json.NewEncoder(g.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// CLI is the fleet-admin command line.
type CLI struct {
	Globals

	Token   TokenCmd   `cmd:"" help:"Enrollment tokens: create, ls, revoke."`
	Devices DevicesCmd `cmd:"" help:"Devices: ls, show, approve, revoke, set-groups, pin, unpin."`
	Groups  GroupsCmd  `cmd:"" help:"Groups: each one's target release and how its devices stand (ls, show)."`
	Release ReleaseCmd `cmd:"" help:"Signed releases: create (from store paths or a flake), ls, show, diff."`
	Deploy  DeployCmd  `cmd:"" help:"Roll a release out to a group or devices, in health-gated batches."`
	Rollout RolloutCmd `cmd:"" help:"Rollouts: ls, show, watch, pause, resume, abort, undo."`
	Admin   AdminCmd   `cmd:"" help:"Admins and their roles: add, ls, remove."`
	Audit   AuditCmd   `cmd:"" help:"The audit trail: ls, verify."`
	Leaf    LeafCmd    `cmd:"" help:"Remote sites: write a leaf node's config, revoke its links."`
	Status  StatusCmd  `cmd:"" help:"The fleet at a glance: one line a device and a summary."`
	Facts   FactsCmd   `cmd:"" help:"A device's fact reports over time."`
	Cmd     CmdCmd     `cmd:"" help:"Send an admin-signed command to devices: reboot, rollback, refresh-facts, apply-now."`
	Payload PayloadCmd `cmd:"" help:"Sealed per-device files (certificates, secrets): push, rm, ls."`
	Escrow  EscrowCmd  `cmd:"" help:"Disk-encryption recovery-key escrow: init, rotate, get, ls."`
	Cache   CacheCmd   `cmd:"" help:"The fleet's binary cache, read by devices over NATS: push, ls, gc."`
	Context ContextCmd `cmd:"" help:"NATS contexts: save one for fleet-admin and the nats command, show the one in use."`
	Version VersionCmd `cmd:"" help:"Print the version."`

	Completion kongcompletion.Completion `cmd:"" help:"Print shell completion for bash, zsh or fish, e.g. source <(fleet-admin completion -c bash)."`
}

// VersionCmd is `fleet-admin version`.
type VersionCmd struct{}

// Run prints the version.
func (VersionCmd) Run(g *Globals) error {
	if g.JSON {
		return g.printJSON(map[string]string{"version": Version})
	}
	_, err := fmt.Fprintln(g.stdout, Version)
	return err
}

// Main parses args and runs the chosen command; it returns the exit code.
// SIGINT and SIGTERM cancel the command's context: a command that waits
// (deploy --wait, rollout watch) says that the rollout continues without it and exits
// with 130.
func Main(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return RunIO(ctx, args, IO{Stdin: os.Stdin, StdinTTY: isatty.IsTerminal(os.Stdin.Fd()), Stdout: os.Stdout, Stderr: os.Stderr})
}

// IO are a run's standard streams.
type IO struct {
	Stdin          io.Reader
	StdinTTY       bool // stdin is a terminal: destructive verbs may ask there
	Stdout, Stderr io.Writer
}

// Run is Main with its context and output streams given, for tests; stdin
// is not a terminal.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return RunIO(ctx, args, IO{Stdout: stdout, Stderr: stderr})
}

// newParser builds fleet-admin's kong parser around cli; exit is what kong
// calls instead of os.Exit (after --help, --version, completion).
func newParser(cli *CLI, stdout, stderr io.Writer, exit func(int)) (*kong.Kong, error) {
	return kong.New(cli, kong.Name("fleet-admin"),
		kong.Description("Manage the fleet: devices, tokens, releases, rollouts.\n\n"+
			"Exit codes: 0 succeeded, 1 error, 2 usage, 3 rollout paused, 4 rollout failed or aborted, "+
			"5 coordinator unreachable, 6 not authorised, 130 interrupted."),
		kong.Configuration(cliconfig.Loader()),
		kong.UsageOnError(),
		kong.Writers(stdout, stderr),
		kong.Exit(exit),
		kong.Vars{"version": Version},
	)
}

// RunIO runs fleet-admin with args and the given streams; it returns the
// exit code.
func RunIO(ctx context.Context, args []string, std IO) int {
	var cli CLI
	// kong exits after --help and --version; record it instead, so Run
	// returns.
	exited, code := false, 0
	parser, err := newParser(&cli, std.Stdout, std.Stderr, func(c int) {
		if !exited {
			exited, code = true, c
		}
	})
	if err != nil {
		fmt.Fprintln(std.Stderr, "fleet-admin:", err)
		return ExitUsage
	}
	// The shell asks for completions by running fleet-admin with COMP_LINE
	// set (see fleet-admin completion).
	kongcompletion.Register(parser)
	if exited {
		return code
	}
	// Bare fleet-admin: the help, not an error.
	if len(args) == 0 {
		args = []string{"--help"}
	}
	kctx, err := parser.Parse(args)
	if exited {
		if code != 0 {
			return ExitUsage
		}
		return 0
	}
	if err != nil {
		fmt.Fprintln(std.Stderr, "fleet-admin:", err)
		return ExitUsage
	}
	cli.ctx, cli.stdout, cli.stderr, cli.stdin, cli.stdinTTY = ctx, std.Stdout, std.Stderr, std.Stdin, std.StdinTTY
	if kctx.Command() != "completion" && kctx.Command() != "completion <shell>" && kctx.Command() != "version" {
		if err := cli.settle(); err != nil {
			fmt.Fprintln(std.Stderr, "fleet-admin:", err)
			return exitCode(ctx, err)
		}
	}
	err = kctx.Run(&cli.Globals, kctx)
	if exited {
		return code
	}
	if err != nil {
		var ce *codedError
		if code := exitCode(ctx, err); code == ExitInterrupted {
			if !errors.As(err, &ce) { // a wait says itself what goes on
				fmt.Fprintln(std.Stderr, "\nfleet-admin: interrupted")
			}
		} else {
			fmt.Fprintln(std.Stderr, "fleet-admin:", err)
		}
		return exitCode(ctx, err)
	}
	return 0
}
