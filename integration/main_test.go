// Package integration runs fleet's real binaries end to end: coordinators,
// agents and fleet-admin, with the host's real Nix.
package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// The binaries under test, built once by TestMain.
var agentBin, coordinatorBin, adminBin, natsServerBin, benchBin string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "fleet-integration-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	agentBin = filepath.Join(dir, "fleet-agent")
	coordinatorBin = filepath.Join(dir, "fleet-coordinator")
	adminBin = filepath.Join(dir, "fleet-admin")
	natsServerBin = filepath.Join(dir, "nats-server")
	benchBin = filepath.Join(dir, "fleet-bench")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "go", "build", "-o", dir+"/", "fleet/cmd/fleet-agent", "fleet/cmd/fleet-coordinator", "fleet/cmd/fleet-admin", "fleet/cmd/fleet-bench",
		// The standard nats-server, built from the module fleet embeds, runs
		// the leaf nodes of remote sites.
		"github.com/nats-io/nats-server/v2").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build binaries: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}
