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

// Recovery-key escrow. The organisation's escrow key pair is a curve key;
// only its public half reaches the coordinator and the agents, in a
// statement an admin signed (so a coordinator cannot swap in its own key).
// Each agent seals each LUKS device's recovery key to it and sends the
// sealed bytes, signed with the device key; the coordinator stores only
// those, in fleet_escrow under "<device>.<disk>".

// Purposes of escrow documents.
const (
	PurposeEscrowKey  = "fleet.escrow-key.v1"  // an admin's escrow key statement
	PurposeEscrow     = "fleet.escrow.v1"      // a device's sealed recovery key
	PurposeEscrowSync = "fleet.escrow-sync.v1" // a device's escrow request
)

// MaxRecoveryKeyBytes bounds a recovery key file.
const MaxRecoveryKeyBytes = 4 << 10

// EscrowKey is the statement naming the current escrow public key.
type EscrowKey struct {
	Key  string    `json:"key"`
	Time time.Time `json:"time"`
}

// VerifyEscrowKey checks an escrow key statement signed by one of trusted.
func VerifyEscrowKey(s *Signed, trusted []string) (*EscrowKey, error) {
	if err := s.Verify(PurposeEscrowKey, trusted); err != nil {
		return nil, fmt.Errorf("escrow key statement: %w", err)
	}
	var k EscrowKey
	if err := s.Decode(&k); err != nil {
		return nil, err
	}
	if !nkeys.IsValidPublicCurveKey(k.Key) || k.Time.IsZero() {
		return nil, fmt.Errorf("escrow key statement: %q is not a curve public key", k.Key)
	}
	return &k, nil
}

// EscrowPut is one sealed recovery key, signed by the device.
type EscrowPut struct {
	Device string `json:"device"`
	// Disk names the LUKS device (as the facts list it, e.g. nvme0n1p2).
	Disk string `json:"disk"`
	// EscrowKey is the public key it is sealed to; Sender the one-time
	// key it was sealed with.
	EscrowKey string    `json:"escrow_key"`
	Sender    string    `json:"sender"`
	Sealed    []byte    `json:"sealed"`
	Time      time.Time `json:"time"`
}

// CheckDisk: a LUKS device name usable in a KV key: letters, digits, '-',
// '_', '.', '/' inside, at most 128.
func CheckDisk(d string) error {
	if d == "" || len(d) > 128 || d[0] == '.' || d[0] == '/' || d[len(d)-1] == '/' || d[len(d)-1] == '.' {
		return fmt.Errorf("%q is not a disk name (e.g. nvme0n1p2)", d)
	}
	for _, r := range d {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.' || r == '/') {
			return fmt.Errorf("%q is not a disk name (e.g. nvme0n1p2)", d)
		}
	}
	return nil
}

// SealRecoveryKey seals a recovery key to the escrow key and signs it with
// the device key.
func SealRecoveryKey(dev nkeys.KeyPair, disk, escrowKey string, key []byte, at time.Time) (Signed, error) {
	id, err := dev.PublicKey()
	if err != nil {
		return Signed{}, err
	}
	if err := CheckDisk(disk); err != nil {
		return Signed{}, err
	}
	if len(key) == 0 || len(key) > MaxRecoveryKeyBytes {
		return Signed{}, fmt.Errorf("recovery key of %s is %d bytes: want 1 to %d", disk, len(key), MaxRecoveryKeyBytes)
	}
	sender, err := nkeys.CreateCurveKeys()
	if err != nil {
		return Signed{}, err
	}
	p := EscrowPut{Device: id, Disk: disk, EscrowKey: escrowKey, Time: at.UTC()}
	p.Sender, _ = sender.PublicKey()
	if p.Sealed, err = sender.Seal(key, escrowKey); err != nil {
		return Signed{}, fmt.Errorf("seal: %w", err)
	}
	return Sign(dev, PurposeEscrow, p)
}

// CheckEscrowPut verifies a sealed recovery key signed by device.
func CheckEscrowPut(s *Signed, device string) (*EscrowPut, error) {
	if err := s.Verify(PurposeEscrow, []string{device}); err != nil {
		return nil, fmt.Errorf("escrow signature: %w", err)
	}
	var p EscrowPut
	if err := s.Decode(&p); err != nil {
		return nil, err
	}
	if p.Device != device {
		return nil, fmt.Errorf("escrow names device %q, not its signer %s", p.Device, device)
	}
	if err := CheckDisk(p.Disk); err != nil {
		return nil, err
	}
	if !nkeys.IsValidPublicCurveKey(p.EscrowKey) || !nkeys.IsValidPublicCurveKey(p.Sender) {
		return nil, errors.New("escrow: escrow key or sender is not a curve key")
	}
	if len(p.Sealed) == 0 || len(p.Sealed) > MaxRecoveryKeyBytes+sealOverhead {
		return nil, fmt.Errorf("escrow of %s: %d sealed bytes, at most %d", p.Disk, len(p.Sealed), MaxRecoveryKeyBytes+sealOverhead)
	}
	return &p, nil
}

// OpenRecoveryKey opens an escrowed key with the escrow key pair.
func OpenRecoveryKey(p *EscrowPut, escrow nkeys.KeyPair) ([]byte, error) {
	pub, _ := escrow.PublicKey()
	if p.EscrowKey != pub {
		return nil, fmt.Errorf("the recovery key of %s is sealed to escrow key %s, not to %s (an older key pair?)", p.Disk, p.EscrowKey, pub)
	}
	b, err := escrow.Open(p.Sealed, p.Sender)
	if err != nil {
		return nil, fmt.Errorf("the recovery key of %s does not open (altered, or sealed to another key): %w", p.Disk, err)
	}
	return b, nil
}

// EscrowFingerprint names a sealed escrow entry without saying anything of
// the key inside.
func EscrowFingerprint(p *EscrowPut) string {
	sum := sha256.Sum256(p.Sealed)
	return hex.EncodeToString(sum[:8])
}

// EscrowHave is what a device says it escrowed for one disk: confirmed
// while the coordinator holds the same sealed entry.
type EscrowHave struct {
	Disk        string `json:"disk"`
	Fingerprint string `json:"fingerprint"`
}

// EscrowSync is a device's escrow request, signed with its key: new sealed
// keys (Puts) and what it escrowed before (Have).
type EscrowSync struct {
	Device string       `json:"device"`
	Time   time.Time    `json:"time"`
	Puts   []Signed     `json:"puts,omitempty"`
	Have   []EscrowHave `json:"have,omitempty"`
}

// EscrowSyncReply answers it: the current escrow key statement (nil: none
// yet) and the disks whose entry the coordinator does not hold as the
// device says (send them again).
type EscrowSyncReply struct {
	Key     *Signed  `json:"key,omitempty"`
	Missing []string `json:"missing,omitempty"`
	Error   string   `json:"error,omitempty"`
}

// EscrowRecord is a fleet_escrow entry: the device's signed sealed key and
// when it was escrowed and last confirmed.
type EscrowRecord struct {
	Signed      Signed    `json:"signed"`
	EscrowedAt  time.Time `json:"escrowed_at"`
	ConfirmedAt time.Time `json:"confirmed_at"`
}

// EscrowView is one device's disk as escrow ls shows it (State: escrowed,
// stale_key: sealed to an older escrow key, missing: a LUKS device the
// facts list with nothing escrowed).
type EscrowView struct {
	Device      string    `json:"device"`
	Name        string    `json:"name"`
	Disk        string    `json:"disk"`
	State       string    `json:"state"`
	EscrowKey   string    `json:"escrow_key,omitempty"`
	EscrowedAt  time.Time `json:"escrowed_at,omitzero"`
	ConfirmedAt time.Time `json:"confirmed_at,omitzero"`
}

// EscrowGet is the argument of escrow-get; the reply is the device's
// records ([]EscrowRecord), to open with the escrow key pair.
type EscrowGet struct {
	Ref  string `json:"ref"`
	Disk string `json:"disk,omitempty"`
}

// EncryptionView is one device's disk-encryption state from its latest
// facts (RootEncrypted nil: not known yet).
type EncryptionView struct {
	Device        string    `json:"device"`
	Name          string    `json:"name"`
	Groups        []string  `json:"groups,omitempty"`
	Online        bool      `json:"online"`
	RootEncrypted *bool     `json:"root_encrypted,omitempty"`
	LUKSDevices   []string  `json:"luks_devices,omitempty"`
	FactsAt       time.Time `json:"facts_at,omitzero"`
}

// Encrypted reports whether the root file system is known to be encrypted.
func (v EncryptionView) Encrypted() bool { return v.RootEncrypted != nil && *v.RootEncrypted }
