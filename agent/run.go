package agent

import "errors"

// Run runs the agent. (Being built: enrollment and the reconcile loop.)
func (cmd *RunCmd) Run(cli *CLI) error { return errors.New("fleet-agent run: not built yet") }

// Run prints this device's facts.
func (cmd *FactsCmd) Run(cli *CLI) error { return errors.New("fleet-agent facts: not built yet") }
