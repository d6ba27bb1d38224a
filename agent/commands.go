package agent

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"fleet/accounts"
	"fleet/model"
	"fleet/subjects"
)

// Remote commands. The coordinator sends an admin-signed command into this
// device's own cmd inbox; the agent takes it only when it is signed by a
// trusted admin key (the release signers), names this device, is fresh,
// and was not taken before (its ID is remembered on disk, so neither a
// replay nor a restart, e.g. after a reboot command, runs it twice). It
// answers with its own signed events: accepted, then done or
// command_failed; or refused.

// DeviceActions are what commands do to the host itself. HostActions are
// the real ones; tests plug in their own, so nothing reboots.
type DeviceActions interface {
	// Reboot starts a reboot of the host.
	Reboot(ctx context.Context) error
	// Rollback returns the system to the profile's previous generation.
	Rollback(ctx context.Context) error
	// ReloadUnit reloads (or restarts) a systemd unit, after a payload it
	// reads landed.
	ReloadUnit(ctx context.Context, unit string) error
}

// HostActions reboot with systemctl (or reboot) and roll back with the
// activator.
type HostActions struct {
	Activator Activator
	Systemctl string
}

// Reboot runs `systemctl reboot` (or `reboot` without systemd).
func (h *HostActions) Reboot(ctx context.Context) error {
	name, args := "reboot", []string{}
	if h.Systemctl != "" {
		name, args = h.Systemctl, []string{"reboot"}
	}
	if out, err := exec.CommandContext(ctx, name, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %v: %w: %s", name, args, err, lastLines(string(out), 5))
	}
	return nil
}

// Rollback returns the system profile to its previous generation and
// switches to it.
func (h *HostActions) Rollback(ctx context.Context) error {
	if h.Activator == nil {
		return errors.New("no activator")
	}
	return h.Activator.Rollback(ctx, Generation{}, model.ActionSwitch)
}

// ReloadUnit runs `systemctl reload-or-restart unit`.
func (h *HostActions) ReloadUnit(ctx context.Context, unit string) error {
	if h.Systemctl == "" {
		return errors.New("no systemctl on this host")
	}
	if out, err := exec.CommandContext(ctx, h.Systemctl, "reload-or-restart", "--", unit).CombinedOutput(); err != nil {
		return fmt.Errorf("systemctl reload-or-restart %s: %w: %s", unit, err, lastLines(string(out), 5))
	}
	return nil
}

// CommandsFile remembers the IDs of the commands this device took.
const CommandsFile = "commands.json"

// commandLog is the set of command IDs taken within the replay horizon.
type commandLog struct {
	path string
	mu   sync.Mutex
	ids  map[string]time.Time
}

// commandHorizon is how long an ID is remembered: past it, the command is
// refused by its age anyway.
const commandHorizon = 2*model.CommandWindow + time.Minute

func loadCommandLog(dir string) (*commandLog, error) {
	l := &commandLog{path: filepath.Join(dir, CommandsFile), ids: map[string]time.Time{}}
	b, err := os.ReadFile(l.path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read %s: %w", l.path, err)
	}
	if len(b) > 0 && json.Unmarshal(b, &l.ids) != nil {
		// Refuse everything until the horizon passes rather than take a
		// replay: a damaged log is treated as a full one.
		return nil, fmt.Errorf("%s is damaged: remove it after %s (commands are refused meanwhile)", l.path, commandHorizon)
	}
	return l, nil
}

// take records id, or reports that it was taken before. It is on disk
// before the command runs.
func (l *commandLog) take(id string, now time.Time) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, at := range l.ids {
		if now.Sub(at) > commandHorizon {
			delete(l.ids, k)
		}
	}
	if _, ok := l.ids[id]; ok {
		return errors.New("the command was taken before (a replay)")
	}
	l.ids[id] = now
	b, _ := json.Marshal(l.ids)
	if err := accounts.WriteSecretFile(l.path, b); err != nil {
		delete(l.ids, id)
		return fmt.Errorf("remember the command: %w", err)
	}
	return nil
}

// commander receives and runs commands, one at a time.
type commander struct {
	a   *Agent
	log *commandLog
	in  chan *nats.Msg
}

// startCommands takes the commands of the device's inbox and runs them
// until ctx ends (wg waits for it); stop stops taking them.
func (a *Agent) startCommands(ctx context.Context, wg *sync.WaitGroup) (stop func()) {
	l, err := loadCommandLog(a.o.StateDir)
	if err != nil {
		a.log.Error().Err(err).Msg("remote commands are refused")
		l = nil
	}
	c := &commander{a: a, log: l, in: make(chan *nats.Msg, 8)}
	stop = a.inbox.handle(subjects.DeviceCmd(a.o.Site, a.o.DeviceID), func(m *nats.Msg) {
		select {
		case c.in <- m:
		default:
			a.log.Warn().Msg("remote command dropped: too many at once")
		}
	})
	wg.Go(func() {
		for {
			select {
			case <-ctx.Done():
				return
			case m := <-c.in:
				c.handle(ctx, m.Data)
			}
		}
	})
	return stop
}

// handle checks and runs one command message.
func (c *commander) handle(ctx context.Context, data []byte) {
	a := c.a
	var s model.Signed
	if err := json.Unmarshal(data, &s); err != nil {
		a.log.Warn().Err(err).Msg("remote command is not a signed document; ignored")
		return
	}
	cmd, err := model.VerifyCommand(&s, a.o.DeviceID, a.o.ReleaseSigners, time.Now())
	if err == nil && c.log == nil {
		err = errors.New("the device's command log is damaged")
	}
	if err == nil {
		err = c.log.take(cmd.ID, time.Now())
	}
	if err != nil {
		// Name the command as it claims to be, so whoever sent it learns
		// of the refusal; nothing of it runs.
		var claimed model.Command
		_ = s.Decode(&claimed)
		if len(claimed.ID) > 64 {
			claimed.ID = claimed.ID[:64]
		}
		a.log.Warn().Err(err).Str("command", claimed.ID).Str("action", string(claimed.Action)).Str("signer", s.Signer).Msg("remote command refused")
		c.event(claimed.ID, claimed.Action, model.CommandRefused, err.Error())
		return
	}
	a.log.Info().Str("command", cmd.ID).Str("action", string(cmd.Action)).Str("signer", s.Signer).Msg("remote command")
	c.event(cmd.ID, cmd.Action, model.CommandAccepted, "")
	err = c.run(ctx, cmd)
	if err != nil {
		c.event(cmd.ID, cmd.Action, model.CommandFailed, err.Error())
	}
}

func (c *commander) run(ctx context.Context, cmd *model.Command) error {
	a := c.a
	actions := a.o.MDM.Actions
	switch cmd.Action {
	case model.CommandRefreshFacts:
		f := a.collect(ctx)
		if err := a.publishFacts(ctx, f); err != nil {
			return fmt.Errorf("facts: %w", err)
		}
	case model.CommandApplyNow:
		a.mu.Lock()
		a.needGet = true
		a.mu.Unlock()
		a.kick()
	case model.CommandRollback:
		if actions == nil {
			return errors.New("this agent cannot roll back on command")
		}
		// Never in the middle of an apply: the two would switch the
		// profile under each other. The admin tries again afterwards.
		if !a.applyMu.TryLock() {
			return errors.New("an apply is in progress: roll back once it has finished")
		}
		err := actions.Rollback(WithAttempt(ctx, "cmd-"+cmd.ID))
		a.applyMu.Unlock()
		if err != nil {
			return err
		}
		a.kickFacts()
	case model.CommandReboot:
		if actions == nil {
			return errors.New("this agent cannot reboot on command")
		}
		// Say so first: after the reboot starts there may be no chance.
		id := c.event(cmd.ID, cmd.Action, model.CommandDone, "reboot starting")
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		a.rep.waitSent(wctx, id)
		cancel()
		return actions.Reboot(ctx)
	default:
		return fmt.Errorf("unknown command %q", cmd.Action)
	}
	c.event(cmd.ID, cmd.Action, model.CommandDone, "")
	return nil
}

// event queues a signed command event and returns its message ID.
func (c *commander) event(id string, action model.CommandAction, result model.Result, msg string) string {
	a := c.a
	attempt := id
	if attempt == "" {
		b := make([]byte, 8)
		_, _ = crand.Read(b)
		attempt = "x" + hex.EncodeToString(b)
	}
	ev := model.Event{Device: a.o.DeviceID, Time: time.Now().UTC(), State: model.StateCommand, Result: result,
		Command: id, Attempt: attempt, Check: string(action)}
	if result == model.CommandDone {
		ev.Log = msg
	} else {
		ev.Error = msg
	}
	msgID := model.EventMsgID(&ev)
	if err := a.rep.enqueue(subjects.DeviceEvents(a.o.DeviceID), msgID, ev, time.Time{}); err != nil {
		a.log.Error().Err(err).Msg("queue command event")
	}
	return msgID
}

// waitSent waits until the event msgID has left the outbox, or ctx ends.
func (r *reporter) waitSent(ctx context.Context, msgID string) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		r.mu.Lock()
		queued := false
		for _, it := range r.queue {
			queued = queued || it.MsgID == msgID
		}
		r.mu.Unlock()
		if !queued {
			return
		}
		r.kick()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
