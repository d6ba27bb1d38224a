package model

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nkeys"

	"fleet/subjects"
)

// MDM duties: remote commands (this part), sealed payloads and recovery-key
// escrow (below).

// CommandAction is what a remote command asks a device to do.
type CommandAction string

const (
	CommandReboot       CommandAction = "reboot"
	CommandRollback     CommandAction = "rollback"
	CommandRefreshFacts CommandAction = "refresh-facts"
	CommandApplyNow     CommandAction = "apply-now"
)

// CommandActions lists every action.
var CommandActions = []CommandAction{CommandReboot, CommandRollback, CommandRefreshFacts, CommandApplyNow}

// ParseCommandAction returns the action named s.
func ParseCommandAction(s string) (CommandAction, error) {
	for _, a := range CommandActions {
		if string(a) == s {
			return a, nil
		}
	}
	return "", fmt.Errorf("unknown command %q (one of reboot, rollback, refresh-facts, apply-now)", s)
}

// CommandWindow is how far a command's signing time may be from the clock
// of whoever checks it (the coordinator, then the device). A device
// remembers the IDs of the commands it took for twice as long, so a
// command is taken once: within the window by its ID, after it by its age.
const CommandWindow = 2 * time.Minute

// Command is the payload of a remote command, signed by an admin with
// PurposeCommand. It is bound to one device (Device), fresh (Time) and
// taken once (ID).
type Command struct {
	ID     string        `json:"id"`
	Device string        `json:"device"`
	Action CommandAction `json:"action"`
	Time   time.Time     `json:"time"`
}

// SignCommand signs a new command for device with the admin key kp.
func SignCommand(kp nkeys.KeyPair, device string, action CommandAction, at time.Time) (Signed, error) {
	if err := subjects.CheckDeviceID(device); err != nil {
		return Signed{}, err
	}
	if _, err := ParseCommandAction(string(action)); err != nil {
		return Signed{}, err
	}
	var id [16]byte
	_, _ = rand.Read(id[:])
	return Sign(kp, PurposeCommand, Command{ID: hex.EncodeToString(id[:]), Device: device, Action: action, Time: at.UTC()})
}

// Errors of VerifyCommand, for callers that branch on them.
var (
	ErrCommandOtherDevice = errors.New("the command is for another device")
	ErrCommandStale       = errors.New("the command is not fresh")
)

// VerifyCommand checks a signed command for device: the signature (by one
// of trusted; nil: any key), the device it is bound to, its action and its
// freshness against now. The caller checks replays by ID.
func VerifyCommand(s *Signed, device string, trusted []string, now time.Time) (*Command, error) {
	if err := s.Verify(PurposeCommand, trusted); err != nil {
		return nil, fmt.Errorf("command signature: %w", err)
	}
	var c Command
	if err := s.Decode(&c); err != nil {
		return nil, err
	}
	if c.ID == "" || len(c.ID) > 64 || c.Time.IsZero() {
		return nil, errors.New("command lacks id or time")
	}
	if _, err := ParseCommandAction(string(c.Action)); err != nil {
		return nil, err
	}
	if c.Device != device {
		return nil, fmt.Errorf("%w: it names %q", ErrCommandOtherDevice, c.Device)
	}
	if skew := now.Sub(c.Time); skew > CommandWindow || skew < -CommandWindow {
		return nil, fmt.Errorf("%w: signed at %s, %s off this clock (more than %s)", ErrCommandStale,
			c.Time.UTC().Format(time.RFC3339), skew.Round(time.Second), CommandWindow)
	}
	return &c, nil
}

// StateCommand is the state of a device's events about a remote command:
// Command names it, Result says how far it got. Its results are not
// Final: a command does not end an apply.
const StateCommand State = "command"

// Results of a command event.
const (
	// CommandAccepted: the device verified the command and is running it.
	CommandAccepted Result = "accepted"
	// CommandDone: the command ran (a reboot: the reboot was started).
	CommandDone Result = "done"
	// CommandFailed: it ran and failed (Error says why).
	CommandFailed Result = "command_failed"
	// CommandRefused: the device refused it (signature, device, age,
	// replay); nothing ran.
	CommandRefused Result = "refused"
)

// CommandRequest is the argument of the command verb: one command signed
// by the requesting admin for each device. Wait asks the coordinator to
// wait for each device's final result rather than its acceptance.
type CommandRequest struct {
	Commands []Signed `json:"commands"`
	Wait     bool     `json:"wait,omitempty"`
}

// MaxCommands bounds the devices of one command request.
const MaxCommands = 500

// Per-device outcomes of a command request, as the coordinator saw them.
const (
	// CommandNotReached: the device is offline; nothing was sent or queued.
	CommandNotReached = "not_reached"
	// CommandNoAnswer: sent, but the device said nothing in time.
	CommandNoAnswer = "no_answer"
	// CommandNotActive: the device is revoked or awaits approval; nothing
	// was sent.
	CommandNotActive = "not_active"
)

// CommandResult is one device's outcome: State is a device's Result
// (accepted, done, command_failed, refused) or one of the coordinator's
// (not_reached, no_answer, not_active).
type CommandResult struct {
	Device  string        `json:"device"`
	Name    string        `json:"name"`
	Command string        `json:"command"`
	Action  CommandAction `json:"action"`
	State   string        `json:"state"`
	Error   string        `json:"error,omitempty"`
}

// OK reports whether the device took the command.
func (r CommandResult) OK() bool {
	return r.State == string(CommandAccepted) || r.State == string(CommandDone)
}
