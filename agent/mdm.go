package agent

import (
	"context"
	"sync"
)

// MDMOptions configure the agent's MDM duties: remote commands, sealed
// payloads and recovery-key escrow.
type MDMOptions struct {
	// Actions carry out reboot and rollback commands (nil: refused as
	// unsupported).
	Actions DeviceActions
}

// startMDM starts the MDM duties; the returned function stops them and
// waits.
func (a *Agent) startMDM(ctx context.Context) (func(), error) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	sub, err := a.startCommands(ctx, &wg)
	if err != nil {
		cancel()
		return nil, err
	}
	return func() {
		_ = sub.Unsubscribe()
		cancel()
		wg.Wait()
	}, nil
}
