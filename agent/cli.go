// Package agent is the fleet agent that runs on each device.
package agent

import (
	"fmt"
	"os"

	"github.com/alecthomas/kong"
)

// Version is set at build time (-ldflags "-X fleet/agent.Version=...").
var Version = "dev"

// CLI is the fleet-agent command line.
type CLI struct {
	Version struct{} `cmd:"" help:"Print the version."`
}

// Main parses args and runs the chosen command; it returns the exit code.
func Main(args []string) int {
	var cli CLI
	parser, err := kong.New(&cli, kong.Name("fleet-agent"),
		kong.Description("The fleet agent: keeps this device on its desired NixOS generation."))
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleet-agent:", err)
		return 2
	}
	kctx, err := parser.Parse(args)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleet-agent:", err)
		return 2
	}
	switch kctx.Command() {
	case "version":
		fmt.Println(Version)
	}
	return 0
}
