// Command fleet-agent runs on each device: it enrols, keeps the device on
// its desired NixOS generation and reports facts and events. See
// `fleet-agent --help`.
package main

import (
	"os"

	"fleet/agent"
)

func main() { os.Exit(agent.Main(os.Args[1:])) }
