// Package admin is fleet-admin, the command line for people and CI.
package admin

import (
	"fmt"
	"os"

	"github.com/alecthomas/kong"
)

// Version is set at build time (-ldflags "-X fleet/admin.Version=...").
var Version = "dev"

// CLI is the fleet-admin command line.
type CLI struct {
	Version struct{} `cmd:"" help:"Print the version."`
}

// Main parses args and runs the chosen command; it returns the exit code.
func Main(args []string) int {
	var cli CLI
	parser, err := kong.New(&cli, kong.Name("fleet-admin"),
		kong.Description("Manage the fleet: devices, tokens, releases, rollouts."))
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleet-admin:", err)
		return 2
	}
	kctx, err := parser.Parse(args)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleet-admin:", err)
		return 2
	}
	switch kctx.Command() {
	case "version":
		fmt.Println(Version)
	}
	return 0
}
