package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"fleet/accounts"
	"fleet/model"
	"fleet/subjects"
)

// Recovery-key escrow. For each LUKS device configured with a recovery key
// file (e.g. the output of systemd-cryptenroll --recovery-key), the agent
// seals the key to the escrow public key and sends it, signed with its own
// key. It learns the escrow key from the coordinator, in a statement an
// admin it trusts signed (or pinned with --escrow-key), and seals again
// when the key file changes (a regenerated key never leaves the old one as
// the only escrowed copy), when the escrow key is rotated, and when the
// coordinator no longer holds what it escrowed; otherwise it confirms what
// it escrowed.

// EscrowFile remembers what the agent escrowed per disk: the hash of the
// key file (never the key), the escrow key and the sealed entry's
// fingerprint.
const EscrowFile = "escrow.json"

type escrowed struct {
	FileHash    string `json:"file_hash"`
	EscrowKey   string `json:"escrow_key"`
	Fingerprint string `json:"fingerprint"`
}

type escrower struct {
	a     *Agent
	files map[string]string // disk -> recovery key file
	path  string
	mu    sync.Mutex
	state map[string]escrowed
	key   string // the escrow key last learnt
	wake  chan struct{}
}

func (a *Agent) newEscrower() (*escrower, error) {
	e := &escrower{a: a, files: a.o.MDM.RecoveryKeys, path: filepath.Join(a.o.StateDir, EscrowFile),
		state: map[string]escrowed{}, wake: make(chan struct{}, 1)}
	for disk := range e.files {
		if err := model.CheckDisk(disk); err != nil {
			return nil, fmt.Errorf("recovery key: %w", err)
		}
	}
	b, err := os.ReadFile(e.path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read %s: %w", e.path, err)
	}
	if len(b) > 0 && json.Unmarshal(b, &e.state) != nil {
		a.log.Warn().Str("file", e.path).Msg("escrow state is damaged; escrowing again")
		e.state = map[string]escrowed{}
	}
	return e, nil
}

func (e *escrower) kick() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// EscrowFilePoll is how often the recovery key files are checked for a
// change.
const EscrowFilePoll = 30 * time.Second

// run syncs on start, on the coordinator's trigger, after a reconnect, when
// a recovery key file changes and on the re-check timer, until ctx ends.
func (e *escrower) run(ctx context.Context) {
	if len(e.files) == 0 {
		return
	}
	poll := e.a.o.MDM.EscrowPoll
	if poll <= 0 {
		poll = EscrowFilePoll
	}
	e.a.syncLoop(ctx, e.wake, poll, e.filesChanged, e.sync, "recovery keys not escrowed; retrying")
}

// readKey reads a recovery key file and its hash.
func readKey(path string) ([]byte, string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, "", err
	}
	b = bytes.TrimSpace(b)
	if len(b) == 0 || len(b) > model.MaxRecoveryKeyBytes {
		return nil, "", fmt.Errorf("recovery key file %s holds %d bytes: want 1 to %d", path, len(b), model.MaxRecoveryKeyBytes)
	}
	sum := sha256.Sum256(b)
	return b, hex.EncodeToString(sum[:]), nil
}

func (e *escrower) filesChanged() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for disk, path := range e.files {
		_, h, err := readKey(path)
		if err == nil && h != e.state[disk].FileHash {
			return true
		}
	}
	return false
}

// sync learns the escrow key, seals and sends what needs it, and confirms
// the rest; a few rounds cover a rotated key or entries the coordinator
// lost.
func (e *escrower) sync(ctx context.Context) error {
	var missing []string
	var lastErr error
	for range 3 {
		r, sent, err := e.round(ctx, missing)
		if err != nil {
			return err
		}
		key, err := e.trustKey(r.Key)
		if err != nil {
			return err
		}
		changed := key != e.key
		e.key = key
		missing = r.Missing
		if len(sent) > 0 {
			e.save(sent)
		}
		if !changed && len(missing) == 0 && !e.pending() {
			return nil
		}
		lastErr = errors.New("escrow did not settle")
	}
	return lastErr
}

// trustKey checks the coordinator's escrow key statement.
func (e *escrower) trustKey(st *model.Signed) (string, error) {
	if st == nil {
		return "", errors.New("no escrow key yet: an owner runs fleet-admin escrow init")
	}
	k, err := model.VerifyEscrowKey(st, e.a.o.ReleaseSigners)
	if err != nil {
		return "", err
	}
	if pin := e.a.o.MDM.EscrowKey; pin != "" && k.Key != pin {
		return "", fmt.Errorf("the coordinator names escrow key %s, not the pinned --escrow-key %s", k.Key, pin)
	}
	return k.Key, nil
}

// pending reports whether some disk needs sealing to the current key.
func (e *escrower) pending() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for disk, path := range e.files {
		_, h, err := readKey(path)
		st := e.state[disk]
		if err == nil && (h != st.FileHash || st.EscrowKey != e.key) {
			return true
		}
	}
	return false
}

// round sends one escrow request: sealed keys for the disks whose file or
// escrow key changed (or that the coordinator misses), and confirmations
// for the rest.
func (e *escrower) round(ctx context.Context, missing []string) (*model.EscrowSyncReply, map[string]escrowed, error) {
	a := e.a
	if !a.nc.IsConnected() {
		return nil, nil, errors.New("not connected")
	}
	req := model.EscrowSync{Device: a.o.DeviceID, Time: time.Now().UTC()}
	sent := map[string]escrowed{}
	e.mu.Lock()
	disks := make([]string, 0, len(e.files))
	for d := range e.files {
		disks = append(disks, d)
	}
	sort.Strings(disks)
	for _, disk := range disks {
		key, h, err := readKey(e.files[disk])
		if err != nil {
			a.log.Warn().Err(err).Str("disk", disk).Msg("recovery key not readable")
			continue
		}
		st := e.state[disk]
		if e.key != "" && (h != st.FileHash || st.EscrowKey != e.key || containsStr(missing, disk)) {
			s, err := model.SealRecoveryKey(a.o.Key, disk, e.key, key, time.Now())
			if err != nil {
				e.mu.Unlock()
				return nil, nil, err
			}
			var p model.EscrowPut
			_ = s.Decode(&p)
			req.Puts = append(req.Puts, s)
			sent[disk] = escrowed{FileHash: h, EscrowKey: e.key, Fingerprint: model.EscrowFingerprint(&p)}
		} else if st.Fingerprint != "" {
			req.Have = append(req.Have, model.EscrowHave{Disk: disk, Fingerprint: st.Fingerprint})
		}
	}
	e.mu.Unlock()
	s, err := model.Sign(a.o.Key, model.PurposeEscrowSync, req)
	if err != nil {
		return nil, nil, err
	}
	body, _ := json.Marshal(s)
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	m, err := a.nc.RequestWithContext(rctx, subjects.EscrowPutFor(a.o.DeviceID), body)
	if err != nil {
		return nil, nil, fmt.Errorf("escrow: %w", err)
	}
	var r model.EscrowSyncReply
	if err := json.Unmarshal(m.Data, &r); err != nil {
		return nil, nil, fmt.Errorf("escrow reply: %w", err)
	}
	if r.Error != "" {
		// A put sealed to a key rotated meanwhile: learn the new key and
		// seal again.
		if r.Key != nil && len(req.Puts) > 0 {
			return &r, nil, nil
		}
		return nil, nil, fmt.Errorf("escrow: %s", r.Error)
	}
	for _, d := range sent {
		a.log.Info().Str("escrow_key", d.EscrowKey).Msg("recovery key escrowed")
	}
	return &r, sent, nil
}

func (e *escrower) save(sent map[string]escrowed) {
	e.mu.Lock()
	for d, s := range sent {
		e.state[d] = s
	}
	b, _ := json.Marshal(e.state)
	e.mu.Unlock()
	if err := accounts.WriteSecretFile(e.path, b); err != nil {
		e.a.log.Error().Err(err).Msg("save escrow state")
	}
}

func containsStr(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// subscribe wires the coordinator's trigger to kick, until stop.
func (e *escrower) subscribe() (stop func()) {
	a := e.a
	return a.inbox.handle(subjects.DeviceEscrowNotify(a.o.Site, a.o.DeviceID), func(*nats.Msg) { e.kick() })
}
