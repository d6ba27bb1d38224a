// Package admin is fleet-admin, the command line for people and CI.
package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"

	"github.com/alecthomas/kong"

	"fleet/cliconfig"
	"fleet/model"
)

// Version is set at build time (-ldflags "-X fleet/admin.Version=...").
var Version = "dev"

// Globals are the flags every command shares. They can also be set from
// FLEET_* environment variables or the JSON file named by --config.
type Globals struct {
	Config kong.ConfigFlag `help:"JSON config file; keys are flag names, e.g. {\"server\": \"nats://fleet:4222\"}." env:"FLEET_ADMIN_CONFIG" placeholder:"FILE"`
	Server string          `help:"Coordinator URL." default:"nats://127.0.0.1:4222" env:"FLEET_SERVER"`
	Creds  string          `help:"Admin credentials file (the first owner's is DATA_DIR/admin.creds)." env:"FLEET_CREDS" type:"path"`
	JSON   bool            `name:"json" help:"Print JSON instead of tables."`
	Limit  int             `help:"Page size of listings: items one reply carries (0: the coordinator's cap). Commands fetch every page." default:"0"`

	ctx            context.Context
	stdout, stderr io.Writer
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
	Devices DevicesCmd `cmd:"" help:"Devices: ls, show, approve, revoke, set-groups."`
	Release ReleaseCmd `cmd:"" help:"Signed releases: create (from store paths or a flake), ls, show, diff."`
	Deploy  DeployCmd  `cmd:"" help:"Roll a release out to a group or devices, in health-gated batches."`
	Rollout RolloutCmd `cmd:"" help:"Rollouts: ls, show, watch, pause, resume, abort."`
	Admin   AdminCmd   `cmd:"" help:"Admins and their roles: add, ls, remove."`
	Audit   AuditCmd   `cmd:"" help:"The audit trail: ls, verify."`
	Leaf    LeafCmd    `cmd:"" help:"Remote sites: write a leaf node's config."`
	Status  StatusCmd  `cmd:"" help:"The fleet at a glance: one line a device and a summary."`
	Facts   FactsCmd   `cmd:"" help:"A device's fact reports over time."`
	Cmd     CmdCmd     `cmd:"" help:"Send an admin-signed command to devices: reboot, rollback, refresh-facts, apply-now."`
	Version VersionCmd `cmd:"" help:"Print the version."`
}

// VersionCmd is `fleet-admin version`.
type VersionCmd struct{}

// Run prints the version.
func (VersionCmd) Run(g *Globals) error {
	_, err := fmt.Fprintln(g.stdout, Version)
	return err
}

// Main parses args and runs the chosen command; it returns the exit code.
func Main(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return Run(ctx, args, os.Stdout, os.Stderr)
}

// Run is Main with its context and output streams given, for tests.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var cli CLI
	// kong exits after --help; record it instead, so Run returns.
	exited := false
	parser, err := kong.New(&cli, kong.Name("fleet-admin"),
		kong.Description("Manage the fleet: devices, tokens, releases, rollouts."),
		kong.Configuration(cliconfig.Loader()),
		kong.UsageOnError(),
		kong.Writers(stdout, stderr),
		kong.Exit(func(int) { exited = true }),
	)
	if err != nil {
		fmt.Fprintln(stderr, "fleet-admin:", err)
		return 2
	}
	kctx, err := parser.Parse(args)
	if exited {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "fleet-admin:", err)
		return 2
	}
	cli.ctx, cli.stdout, cli.stderr = ctx, stdout, stderr
	if err := kctx.Run(&cli.Globals); err != nil {
		fmt.Fprintln(stderr, "fleet-admin:", err)
		return 1
	}
	return 0
}
