package model

import (
	"crypto/rand"
	"crypto/sha256"
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

// Sealed payloads: a file (a certificate, a secret) for one device, sealed
// by the admin to the device's curve key (xkey) and signed, so the
// coordinator stores and forwards only bytes it cannot open or alter.

// PurposePayload signs a sealed payload; PurposePayloadSync a device's
// request for its payloads.
const (
	PurposePayload     = "fleet.payload.v1"
	PurposePayloadSync = "fleet.payload-sync.v1"
)

// MaxPayloadBytes bounds a payload's plaintext: certificates, keys and
// small config secrets, not files.
const MaxPayloadBytes = 64 << 10

// Payload is the signed document of one sealed payload.
type Payload struct {
	Name   string `json:"name"`
	Device string `json:"device"`
	// Mode is the file's permission bits (e.g. 0o400); Owner the user
	// (and Group the group) that owns it ("": the agent's).
	Mode  uint32 `json:"mode"`
	Owner string `json:"owner,omitempty"`
	Group string `json:"group,omitempty"`
	// Reload names a systemd unit to reload once the file landed.
	Reload string `json:"reload,omitempty"`
	// SHA256 and Size are the plaintext's.
	SHA256 string `json:"sha256"`
	Size   int    `json:"size"`
	// NotAfter is the expiry of the certificate the file holds (zero:
	// none).
	NotAfter time.Time `json:"not_after,omitzero"`
	// Sender is the one-time curve key the box was sealed with.
	Sender string    `json:"sender"`
	Sealed []byte    `json:"sealed"`
	Time   time.Time `json:"time"`
}

// CheckPayloadName: a file name of letters, digits, '.', '-' and '_', not
// starting with a dot, at most 64.
func CheckPayloadName(n string) error {
	if n == "" || len(n) > 64 || n[0] == '.' {
		return fmt.Errorf("%q is not a payload name (letters, digits, '.', '-', '_', not starting with '.', at most 64)", n)
	}
	for _, r := range n {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_') {
			return fmt.Errorf("%q is not a payload name (letters, digits, '.', '-', '_', not starting with '.', at most 64)", n)
		}
	}
	return nil
}

// ErrPayloadTooLarge is returned for a payload over MaxPayloadBytes.
var ErrPayloadTooLarge = errors.New("payload too large")

// SealPayload seals data to the device's xkey with a one-time curve key and
// signs the result with the admin key kp. p carries the name, device and
// file attributes; the rest is filled in.
func SealPayload(kp nkeys.KeyPair, xkey string, p Payload, data []byte, at time.Time) (Signed, error) {
	if len(data) > MaxPayloadBytes {
		return Signed{}, fmt.Errorf("%w: %d bytes, at most %d", ErrPayloadTooLarge, len(data), MaxPayloadBytes)
	}
	if err := CheckPayloadName(p.Name); err != nil {
		return Signed{}, err
	}
	if err := subjects.CheckDeviceID(p.Device); err != nil {
		return Signed{}, err
	}
	if !nkeys.IsValidPublicCurveKey(xkey) {
		return Signed{}, fmt.Errorf("device %s has no valid xkey (%q): it cannot receive sealed payloads", p.Device, xkey)
	}
	sender, err := nkeys.CreateCurveKeys()
	if err != nil {
		return Signed{}, err
	}
	p.Sender, _ = sender.PublicKey()
	if p.Sealed, err = sender.Seal(data, xkey); err != nil {
		return Signed{}, fmt.Errorf("seal: %w", err)
	}
	sum := sha256.Sum256(data)
	p.SHA256, p.Size, p.Time = hex.EncodeToString(sum[:]), len(data), at.UTC()
	if p.Mode == 0 {
		p.Mode = 0o400
	}
	return Sign(kp, PurposePayload, p)
}

// CheckPayload verifies a signed payload's signature (by one of trusted;
// nil: any) and shape, for device, without opening it.
func CheckPayload(s *Signed, device string, trusted []string) (*Payload, error) {
	if err := s.Verify(PurposePayload, trusted); err != nil {
		return nil, fmt.Errorf("payload signature: %w", err)
	}
	var p Payload
	if err := s.Decode(&p); err != nil {
		return nil, err
	}
	if err := CheckPayloadName(p.Name); err != nil {
		return nil, err
	}
	if p.Device != device {
		return nil, fmt.Errorf("payload %s is for device %q, not %s", p.Name, p.Device, device)
	}
	if p.Size > MaxPayloadBytes || len(p.Sealed) > MaxPayloadBytes+sealOverhead {
		return nil, fmt.Errorf("%w: payload %s is %d bytes, at most %d", ErrPayloadTooLarge, p.Name, max(p.Size, len(p.Sealed)), MaxPayloadBytes)
	}
	if p.Mode&^0o7777 != 0 {
		return nil, fmt.Errorf("payload %s: mode %o is not a permission mode", p.Name, p.Mode)
	}
	if !nkeys.IsValidPublicCurveKey(p.Sender) {
		return nil, fmt.Errorf("payload %s: sender %q is not a curve key", p.Name, p.Sender)
	}
	return &p, nil
}

// OpenPayload verifies a signed payload for device and opens it with the
// device's curve key xk. The plaintext must match the signed hash.
func OpenPayload(s *Signed, device string, trusted []string, xk nkeys.KeyPair) (*Payload, []byte, error) {
	p, err := CheckPayload(s, device, trusted)
	if err != nil {
		return nil, nil, err
	}
	data, err := xk.Open(p.Sealed, p.Sender)
	if err != nil {
		return nil, nil, fmt.Errorf("payload %s does not open with this device's key (sealed to another key, or altered): %w", p.Name, err)
	}
	sum := sha256.Sum256(data)
	if hex.EncodeToString(sum[:]) != p.SHA256 || len(data) != p.Size {
		return nil, nil, fmt.Errorf("payload %s: the opened content does not match its signed hash", p.Name)
	}
	return p, data, nil
}

// PayloadPush is the argument of payload-push: one sealed payload per
// device, each signed by the requesting admin.
type PayloadPush struct {
	Payloads []Signed `json:"payloads"`
}

// PayloadRemove is the argument of payload-rm: withdraw Name from Devices
// (IDs; empty: from every device that has it).
type PayloadRemove struct {
	Name    string   `json:"name"`
	Devices []string `json:"devices,omitempty"`
}

// PayloadQuery is the argument of the payloads verb.
type PayloadQuery struct {
	Name  string `json:"name,omitempty"`
	Group string `json:"group,omitempty"`
}

// PayloadRecord is a payload as fleet_payloads keeps it (key
// "<device>.<name>"): the signed sealed document and its delivery state.
type PayloadRecord struct {
	Signed   Signed    `json:"signed"`
	PushedBy string    `json:"pushed_by"`
	PushedAt time.Time `json:"pushed_at"`
	// Delivered is the hash the device last reported for the file, at
	// DeliveredAt; Error its last error with this payload.
	Delivered   string    `json:"delivered,omitempty"`
	DeliveredAt time.Time `json:"delivered_at,omitzero"`
	Error       string    `json:"error,omitempty"`
}

// PayloadView is one device's payload as payload ls shows it: never the
// sealed bytes.
type PayloadView struct {
	Device      string    `json:"device"`
	DeviceName  string    `json:"device_name"`
	Name        string    `json:"name"`
	SHA256      string    `json:"sha256"`
	Size        int       `json:"size"`
	Mode        uint32    `json:"mode"`
	Owner       string    `json:"owner,omitempty"`
	Reload      string    `json:"reload,omitempty"`
	NotAfter    time.Time `json:"not_after,omitzero"`
	PushedBy    string    `json:"pushed_by"`
	PushedAt    time.Time `json:"pushed_at"`
	State       string    `json:"state"` // delivered, pending, failed
	DeliveredAt time.Time `json:"delivered_at,omitzero"`
	Error       string    `json:"error,omitempty"`
}

// PayloadHave is what a device holds of one payload: the hash of the file
// it wrote, or its error with it.
type PayloadHave struct {
	Name   string `json:"name"`
	SHA256 string `json:"sha256,omitempty"`
	Error  string `json:"error,omitempty"`
}

// PayloadSync is a device's request for its payloads, signed with its key
// (PurposePayloadSync): it says what it holds.
type PayloadSync struct {
	Device string        `json:"device"`
	Time   time.Time     `json:"time"`
	Have   []PayloadHave `json:"have,omitempty"`
}

// PayloadSyncReply answers it: every payload the device should hold.
type PayloadSyncReply struct {
	Payloads []Signed `json:"payloads"`
	Error    string   `json:"error,omitempty"`
}

// sealOverhead is what sealing adds to a plaintext: nkeys' version tag,
// the nonce and the box's authenticator.
const sealOverhead = 4 + 24 + 16
