package broker_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"fleet/admin"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

func resultOf(t *testing.T, res []model.CommandResult, id string) model.CommandResult {
	t.Helper()
	for _, r := range res {
		if r.Device == id {
			return r
		}
	}
	t.Fatalf("no result for %s in %+v", id, res)
	return model.CommandResult{}
}

// Online devices answer at once with their own signed events; an offline
// one is reported as not reached and nothing is queued for it: it does
// not run the command when it comes back.
func TestCommandOnlineAnswersOfflineNotReached(t *testing.T) {
	c, owner, tok := mdmFleet(t, 3, "lab")
	a := runDevice(t, c, tok, "cmd-a", owner.Key(), nil)
	b := runDevice(t, c, tok, "cmd-b", owner.Key(), nil)
	b.stop()
	poll.Until(t, 10*time.Second, "cmd-b offline", func() bool { return !c.Presence().Online(b.id) })

	ctx := mdmCtx(t, 40*time.Second)
	res, err := owner.Command(ctx, []string{a.id, b.id}, model.CommandReboot, true)
	if err != nil {
		t.Fatal(err)
	}
	if r := resultOf(t, res, a.id); r.State != string(model.CommandDone) || r.Name != "cmd-a" {
		t.Errorf("online device: %+v", r)
	}
	if r := resultOf(t, res, b.id); r.State != model.CommandNotReached || !strings.Contains(r.Error, "offline") {
		t.Errorf("offline device: %+v", r)
	}
	// "done" is said before the reboot starts: there may be no chance after.
	poll.Until(t, 10*time.Second, "online device rebooted", func() bool { n, _ := a.actions.counts(); return n == 1 })

	// Without --wait the answer is the acceptance; every action runs.
	for _, act := range []model.CommandAction{model.CommandRollback, model.CommandRefreshFacts, model.CommandApplyNow} {
		res, err := owner.Command(ctx, []string{a.id}, act, false)
		if err != nil {
			t.Fatal(err)
		}
		if r := resultOf(t, res, a.id); !r.OK() {
			t.Errorf("%s: %+v", act, r)
		}
	}
	poll.Until(t, 10*time.Second, "rollback ran", func() bool { _, n := a.actions.counts(); return n == 1 })

	// Back online, b runs nothing: nothing was queued.
	_ = restartDevice(t, c, b, owner.Key())
	wantNoReboots(t, b, "offline device")
}

// A command with a forged signature (a refresh-facts signature over a
// reboot payload) is refused by the coordinator, nothing is sent, and the
// refusal is in the audit trail; so are commands signed by a key that is
// not the requesting admin's, and a viewer's.
func TestCommandForgedSignatureRefusedAndAudited(t *testing.T) {
	c, owner, tok := mdmFleet(t, 1, "lab")
	d := runDevice(t, c, tok, "forge-a", owner.Key(), nil)
	ev := watchCommandEvents(t, c, d.id)
	ctx := mdmCtx(t, 40*time.Second)

	cred, _ := c.Authority().NewUser(subjects.RoleOperator, "x", 0)
	s, err := model.SignCommand(cred.Key, d.id, model.CommandRefreshFacts, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	var cmd model.Command
	_ = json.Unmarshal(s.Payload, &cmd)
	cmd.Action = model.CommandReboot
	s.Payload, _ = json.Marshal(cmd)
	own, _ := model.SignCommand(newUserKey(t), d.id, model.CommandReboot, time.Now()) // a stranger's key
	for name, sc := range map[string]model.Signed{"forged": s, "stranger": own} {
		err := owner.Call(ctx, subjects.VerbCommand, true, model.CommandRequest{Commands: []model.Signed{sc}}, nil)
		var ae *admin.APIError
		if !errors.As(err, &ae) || ae.Code != model.CodeRefused {
			t.Fatalf("%s: %v, want a refusal", name, err)
		}
		mdmWantErr(t, err, "command signature")
	}
	viewer := addAdmin(t, c, subjects.RoleViewer, "v")
	_, err = viewer.Command(ctx, []string{d.id}, model.CommandReboot, false)
	mdmWantErr(t, err, "may not call command")

	refusals := 0
	for _, r := range auditRecords(t, c) {
		if r.Verb == subjects.VerbCommand && r.Result == model.AuditRefused {
			refusals++
		}
	}
	if refusals != 3 {
		t.Errorf("%d refused commands audited, want 3", refusals)
	}
	// A good command afterwards proves the device was listening all along.
	res, err := owner.Command(ctx, []string{d.id}, model.CommandRefreshFacts, true)
	if err != nil || !resultOf(t, res, d.id).OK() {
		t.Fatalf("good command: %+v, %v", res, err)
	}
	wantNoReboots(t, d, "device, on refused commands")
	ev.mu.Lock()
	for _, e := range ev.evs {
		if e.Check == string(model.CommandReboot) {
			t.Errorf("the device heard of a refused reboot: %+v", e)
		}
	}
	ev.mu.Unlock()
	// And it is in the audit with its result.
	recs := auditRecords(t, c)
	if last := recs[len(recs)-1]; last.Verb != subjects.VerbCommand || last.Result != model.AuditOK {
		t.Errorf("last audit record %+v", last)
	}
}

// The device checks every command itself, as if the coordinator were
// compromised: commands injected straight into its cmd inbox that a
// non-admin key signed, that name another device, that are stale, or that
// replay one it took, are refused (with its own signed event) and nothing
// runs.
func TestAgentRefusesForgedStaleAndReplayedCommands(t *testing.T) {
	c, owner, tok := mdmFleet(t, 2, "lab")
	d := runDevice(t, c, tok, "dev-a", owner.Key(), nil)
	other := runDevice(t, c, tok, "dev-b", owner.Key(), nil)
	ev := watchCommandEvents(t, c, d.id)
	ownerKey := readOwnerKey(t, c)

	inject := func(s model.Signed) string {
		t.Helper()
		b, _ := json.Marshal(s)
		if err := c.ClientConn().Publish(subjects.DeviceCmd(subjects.DefaultSite, d.id), b); err != nil {
			t.Fatal(err)
		}
		var cmd model.Command
		_ = json.Unmarshal(s.Payload, &cmd)
		return cmd.ID
	}
	waitResult := func(id string, want model.Result, errPart string) {
		t.Helper()
		poll.Telling(t, 10*time.Second, "device answers "+string(want), func() (bool, string) {
			evs := ev.of(id)
			if len(evs) == 0 {
				return false, "no event"
			}
			last := evs[len(evs)-1]
			return last.Result == want && strings.Contains(last.Error, errPart), last.Error
		})
	}

	stranger, _ := model.SignCommand(newUserKey(t), d.id, model.CommandReboot, time.Now())
	waitResult(inject(stranger), model.CommandRefused, "signer is not trusted")
	forOther, _ := model.SignCommand(ownerKey, other.id, model.CommandReboot, time.Now())
	waitResult(inject(forOther), model.CommandRefused, "another device")
	stale, _ := model.SignCommand(ownerKey, d.id, model.CommandReboot, time.Now().Add(-model.CommandWindow-time.Minute))
	waitResult(inject(stale), model.CommandRefused, "not fresh")
	forged, _ := model.SignCommand(ownerKey, d.id, model.CommandRefreshFacts, time.Now())
	var fc model.Command
	_ = json.Unmarshal(forged.Payload, &fc)
	fc.Action = model.CommandReboot
	forged.Payload, _ = json.Marshal(fc)
	waitResult(inject(forged), model.CommandRefused, "signature does not match")
	if !wantNoReboots(t, d, "on refused commands") {
		t.FailNow()
	}

	good, _ := model.SignCommand(ownerKey, d.id, model.CommandReboot, time.Now())
	id := inject(good)
	waitResult(id, model.CommandDone, "")
	poll.Until(t, 10*time.Second, "reboot ran", func() bool { n, _ := d.actions.counts(); return n == 1 })
	inject(good)
	poll.Until(t, 10*time.Second, "replay refused", func() bool {
		evs := ev.of(id)
		return len(evs) > 0 && evs[len(evs)-1].Result == model.CommandRefused && strings.Contains(evs[len(evs)-1].Error, "replay")
	})
	// After a restart (the reboot) the device still knows the command.
	d.stop()
	d2 := restartDevice(t, c, d, owner.Key())
	// The restarted agent subscribes a moment after it connects: send
	// until it answers.
	tries := 0
	poll.Until(t, 10*time.Second, "replay after restart refused", func() bool {
		replays := 0
		for _, e := range ev.of(id) {
			if e.Result == model.CommandRefused && strings.Contains(e.Error, "replay") {
				replays++
			}
		}
		if tries++; tries%20 == 1 {
			inject(good)
		}
		return replays >= 2
	})
	wantNoReboots(t, d2, "restarted device, on a replay")
	wantNoReboots(t, other, "the other device")
}

// A revoked device gets nothing, with a clear result; an unknown one is an
// error.
func TestCommandRevokedDevice(t *testing.T) {
	c, owner, tok := mdmFleet(t, 1, "lab")
	d := runDevice(t, c, tok, "gone", owner.Key(), nil)
	ctx := mdmCtx(t, 30*time.Second)
	if _, err := owner.RevokeDevice(ctx, d.id); err != nil {
		t.Fatal(err)
	}
	res, err := owner.Command(ctx, []string{d.id}, model.CommandReboot, false)
	if err != nil {
		t.Fatal(err)
	}
	if r := resultOf(t, res, d.id); r.State != model.CommandNotActive || !strings.Contains(r.Error, "revoked") {
		t.Errorf("revoked device: %+v", r)
	}
	_, err = owner.Command(ctx, []string{pubOfKey(newUserKey(t))}, model.CommandReboot, false)
	mdmWantErr(t, err, "no device")
	wantNoReboots(t, d, "revoked device")
}

// A running agent holds two subscriptions on its connection, whatever its
// duties: its inbox's triggers, commands and kicks (one wildcard), and
// nats.go's request mux. The coordinator keeps every subscription of every
// connection of the fleet; one per duty was five.
func TestAgentHoldsTwoSubscriptions(t *testing.T) {
	c, owner, tok := mdmFleet(t, 1, "lab")
	d := runDevice(t, c, tok, "subs", owner.Key(), nil)
	ctx := mdmCtx(t, 30*time.Second)
	// A command reaches it through the shared subscription.
	res, err := owner.Command(ctx, []string{d.id}, model.CommandRefreshFacts, true)
	if err != nil {
		t.Fatal(err)
	}
	if r := resultOf(t, res, d.id); !r.OK() {
		t.Fatalf("refresh-facts: %+v", r)
	}
	var subs []string
	poll.Telling(t, 10*time.Second, "the agent's subscriptions as the server sees them", func() (bool, string) {
		cz, err := c.Server().Connz(&server.ConnzOptions{Subscriptions: true, Account: c.Authority().FleetAccount(), Limit: 1024})
		if err != nil {
			return false, err.Error()
		}
		for _, ci := range cz.Conns {
			if ci.Name == "subs" {
				subs = ci.Subs
				slices.Sort(subs)
				return len(subs) == 2, fmt.Sprint(subs)
			}
		}
		return false, "no connection named subs"
	})
	prefix := subjects.DeviceInboxPrefix(d.creds.Site(), d.id)
	if subs[0] != subjects.DeviceInboxLeaves(d.creds.Site(), d.id) || !strings.HasPrefix(subs[1], prefix+".") || !strings.HasSuffix(subs[1], ".*") {
		t.Errorf("subscriptions %q, want %s.* and the request mux under it", subs, prefix)
	}
}
