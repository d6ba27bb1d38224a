package agent

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// NixTools are the programs the agent runs to fetch and switch systems.
var NixTools = []string{"nix", "nix-store", "nix-env"}

// CheckHost checks at start that this host can run the agent, so a wrong
// setup is named at once, with the flag to fix, rather than at the first
// apply: the state dir must be writable, the link to the running system
// (--current-system) must exist, and Nix's tools must be on PATH.
func CheckHost(stateDir, currentSystem string) error {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return fmt.Errorf("--state-dir %s cannot be created (%w): the agent keeps its keys, creds and apply state there; run it as root or pass --state-dir with a directory it can write", stateDir, errors.Unwrap(err))
	}
	f, err := os.CreateTemp(stateDir, ".write-check-*")
	if err != nil {
		return fmt.Errorf("--state-dir %s is not writable (%v): the agent keeps its keys, creds and apply state there; run it as root or pass --state-dir with a directory it can write", stateDir, errors.Unwrap(err))
	}
	f.Close()
	os.Remove(f.Name())
	if _, err := os.Stat(currentSystem); err != nil {
		return fmt.Errorf("--current-system %s: %v: this host has no link to its running NixOS system; run the agent on NixOS, or pass --current-system with the link to the running system", currentSystem, errors.Unwrap(err))
	}
	var missing []string
	for _, t := range NixTools {
		if _, err := exec.LookPath(t); err != nil {
			missing = append(missing, t)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s not on PATH (%s): the agent fetches closures and switches systems with Nix; run it on NixOS, or put Nix's bin directory on its PATH (the NixOS module does)",
			strings.Join(missing, ", "), os.Getenv("PATH"))
	}
	return nil
}
