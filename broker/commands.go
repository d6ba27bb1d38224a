package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"fleet/model"
	"fleet/subjects"
)

// Remote commands. An admin signs one command per device (bound to its ID,
// fresh, with an ID the device takes once); the coordinator checks each is
// signed by the admin who asks, that the admin may act on the device, and
// sends it into the device's own cmd inbox, only while the device is
// online: nothing is queued. The device checks it again (signer among its
// trusted admin keys, its own ID, age, replay) and answers with its own
// signed events (StateCommand), which the coordinator stores like every
// event and picks up from CORE to tell the admin.

// How long the coordinator waits for devices: for their acceptance, or
// (wait) for their final result. Both stay inside the API's 30 s request
// budget.
const (
	commandAckWait  = 10 * time.Second
	commandDoneWait = 25 * time.Second
)

func (s *services) commandVerb() apiVerb {
	return apiVerb{subjects.VerbCommand, true, subjects.RoleOperator, s.command}
}

// commandTarget is a checked command and the device it is for.
type commandTarget struct {
	dev    *model.Device
	cmd    *model.Command
	signed model.Signed
}

func (s *services) command(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	var a model.CommandRequest
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	if len(a.Commands) == 0 {
		return nil, badRequest("no commands: name a device (--device) or a group (--group) with devices")
	}
	if len(a.Commands) > model.MaxCommands {
		return nil, badRequest("%d commands in one request, at most %d: send them in parts", len(a.Commands), model.MaxCommands)
	}
	// Every command is checked before any is sent: a request with one
	// forged or foreign command sends nothing.
	now := s.now()
	targets := make([]commandTarget, 0, len(a.Commands))
	seen := map[string]bool{}
	for i := range a.Commands {
		sc := a.Commands[i]
		var claimed model.Command
		if err := sc.Decode(&claimed); err != nil {
			return nil, badRequest("command %d: %v", i+1, err)
		}
		cmd, err := model.VerifyCommand(&sc, claimed.Device, []string{who.Key}, now)
		if err != nil {
			return nil, refused("command %d (%s for %s): %v: every command must be signed by the admin who sends it, for one device, within %s",
				i+1, claimed.Action, claimed.Device, err, model.CommandWindow)
		}
		if seen[cmd.Device] {
			return nil, badRequest("device %s is named twice", cmd.Device)
		}
		seen[cmd.Device] = true
		d, _, err := s.getDevice(ctx, cmd.Device)
		if err != nil {
			return nil, err
		}
		if err := mayTouch(who, d.Groups); err != nil {
			return nil, err
		}
		targets = append(targets, commandTarget{dev: d, cmd: cmd, signed: sc})
	}
	wait := commandAckWait
	if a.Wait {
		wait = commandDoneWait
	}
	if dl, ok := ctx.Deadline(); ok {
		wait = min(wait, time.Until(dl)-2*time.Second)
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	out := make([]model.CommandResult, len(targets))
	var wg sync.WaitGroup
	for i := range targets {
		wg.Go(func() { out[i] = s.dispatch(wctx, targets[i], a.Wait) })
	}
	wg.Wait()
	return out, nil
}

// dispatch sends one checked command to its device, if it is active and
// online, and waits for the device's answer.
func (s *services) dispatch(ctx context.Context, t commandTarget, wait bool) model.CommandResult {
	d := t.dev
	r := model.CommandResult{Device: d.ID, Name: d.Name, Command: t.cmd.ID, Action: t.cmd.Action}
	if d.Status != model.DeviceActive {
		r.State, r.Error = model.CommandNotActive, fmt.Sprintf("device is %s: nothing sent", d.Status)
		return r
	}
	if s.presence == nil || !s.presence.Online(d.ID) {
		r.State, r.Error = model.CommandNotReached, "device is offline: nothing sent or queued; send the command again when it is online"
		return r
	}
	// The device's verified events as stored, in CORE: whichever
	// coordinator of a cluster took them, they pass here.
	sub, err := s.c.nc.SubscribeSync(subjects.DeviceEvents(d.ID))
	if err != nil {
		r.State, r.Error = model.CommandNoAnswer, "the coordinator could not listen for the answer: "+err.Error()
		return r
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := s.c.nc.Flush(); err != nil {
		r.State, r.Error = model.CommandNoAnswer, "the coordinator could not listen for the answer: "+err.Error()
		return r
	}
	b, _ := json.Marshal(t.signed)
	if err := s.c.fc.Publish(subjects.DeviceCmd(siteOf(d), d.ID), b); err != nil {
		r.State, r.Error = model.CommandNoAnswer, "send: "+err.Error()
		return r
	}
	for {
		m, err := sub.NextMsgWithContext(ctx)
		if err != nil {
			if r.State == "" {
				r.State, r.Error = model.CommandNoAnswer, "the device was online but did not answer in time"
			}
			return r
		}
		var ev model.Event
		if json.Unmarshal(m.Data, &ev) != nil || ev.State != model.StateCommand || ev.Command != t.cmd.ID {
			continue
		}
		r.State, r.Error = string(ev.Result), ev.Error
		if !wait || ev.Result != model.CommandAccepted {
			return r
		}
	}
}
