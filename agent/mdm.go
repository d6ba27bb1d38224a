package agent

import (
	"context"
	"errors"
	"io/fs"
	"path/filepath"
	"sync"
	"time"

	"github.com/nats-io/nkeys"
)

// MDMOptions configure the agent's MDM duties: remote commands, sealed
// payloads and recovery-key escrow.
type MDMOptions struct {
	// Actions carry out reboot and rollback commands and reload units
	// after payloads (nil: refused as unsupported).
	Actions DeviceActions
	// XKey opens sealed payloads (nil: STATE_DIR/agent.xk).
	XKey nkeys.KeyPair
	// PayloadDir is where payloads land (default DefaultPayloadDir).
	PayloadDir string
	// RecoveryKeys maps each LUKS device (as the facts name it) to its
	// recovery key file, to escrow.
	RecoveryKeys map[string]string
	// EscrowKey pins the escrow public key (""): statements signed by a
	// trusted admin decide).
	EscrowKey string
	// EscrowPoll is how often recovery key files are checked for a
	// change (default EscrowFilePoll).
	EscrowPoll time.Duration
}

// startMDM readies the MDM duties and routes their inbox subjects; start
// runs their loops (once the inbox is subscribed: a kick sent after a
// loop's first sync must find the subscription), stop stops them and
// waits.
func (a *Agent) startMDM(ctx context.Context) (start, stop func(), err error) {
	if a.o.MDM.XKey == nil {
		xk, err := loadOrCreateKey(filepath.Join(a.o.StateDir, XKeyFile), nkeys.PrefixByteCurve, func() (nkeys.KeyPair, error) {
			return nil, fs.ErrNotExist
		})
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, nil, err
		}
		a.o.MDM.XKey = xk
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var handled []func()
	stop = func() {
		for _, s := range handled {
			s()
		}
		cancel()
		wg.Wait()
	}
	handled = append(handled, a.startCommands(ctx, &wg))
	pl, err := a.newPayloads()
	if err != nil {
		stop()
		return nil, nil, err
	}
	handled = append(handled, pl.subscribe())
	es, err := a.newEscrower()
	if err != nil {
		stop()
		return nil, nil, err
	}
	handled = append(handled, es.subscribe())
	start = func() {
		wg.Go(func() { pl.run(ctx) })
		wg.Go(func() { es.run(ctx) })
	}
	return start, stop, nil
}

// syncLoop runs sync on start, on a kick through wake, after a reconnect
// and on the re-check timer (Options.Recheck), until ctx ends; a failed
// sync is logged with failed and retried after 10 s. Every poll it looks
// for a reconnect (a coordinator may have lost what it was told while the
// device was away) and, when there was none, asks changed (nil: nothing
// else to watch) whether to sync anyway.
func (a *Agent) syncLoop(ctx context.Context, wake <-chan struct{}, poll time.Duration, changed func() bool,
	sync func(context.Context) error, failed string) {
	recheck := a.o.Recheck
	if recheck <= 0 {
		recheck = 15 * time.Minute
	}
	timer := time.NewTimer(0)
	defer timer.Stop()
	tick := time.NewTicker(poll)
	defer tick.Stop()
	last := a.nc.Stats().Reconnects
	for {
		select {
		case <-ctx.Done():
			return
		case <-wake:
		case <-timer.C:
		case <-tick.C:
			if n := a.nc.Stats().Reconnects; n != last {
				last = n
				break
			}
			if changed == nil || !changed() {
				continue
			}
		}
		delay := recheck
		if err := sync(ctx); err != nil {
			a.log.Warn().Err(err).Msg(failed)
			delay = 10 * time.Second
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(delay)
	}
}
