package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"fleet/accounts"
	"fleet/model"
	"fleet/subjects"
)

// Sealed payloads. The agent asks the coordinator for its payloads (a
// request signed with its key, saying what it holds), opens each with its
// xkey after checking the admin's signature, and writes it atomically
// under the payload dir with the requested mode and owner; it removes the
// files of payloads that were withdrawn. A payload that does not verify or
// open is reported as an error and nothing is written.

// DefaultPayloadDir is where payloads land by default (tmpfs on NixOS).
const DefaultPayloadDir = "/run/fleet/payloads"

// PayloadsFile remembers which payloads the agent wrote, with their hash.
const PayloadsFile = "payloads.json"

// payloadState is what the agent holds of each payload: the hash of the
// file it wrote, or its error.
type payloadState map[string]model.PayloadHave

type payloads struct {
	a    *Agent
	dir  string
	path string
	mu   sync.Mutex
	have payloadState
	wake chan struct{}
}

func (a *Agent) newPayloads() (*payloads, error) {
	dir := a.o.MDM.PayloadDir
	if dir == "" {
		dir = DefaultPayloadDir
	}
	p := &payloads{a: a, dir: dir, path: filepath.Join(a.o.StateDir, PayloadsFile), have: payloadState{}, wake: make(chan struct{}, 1)}
	b, err := os.ReadFile(p.path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read %s: %w", p.path, err)
	}
	if len(b) > 0 && json.Unmarshal(b, &p.have) != nil {
		a.log.Warn().Str("file", p.path).Msg("payload state is damaged; payloads are fetched again")
		p.have = payloadState{}
	}
	return p, nil
}

func (p *payloads) kick() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// run syncs on start, on the coordinator's trigger, after a reconnect and
// on the re-check timer, until ctx ends.
func (p *payloads) run(ctx context.Context) {
	p.a.syncLoop(ctx, p.wake, 2*time.Second, nil, p.sync, "payloads not synced; retrying")
}

// sync asks for the device's payloads, applies them, and reports what it
// holds afterwards when that changed.
func (p *payloads) sync(ctx context.Context) error {
	for range 2 {
		reply, err := p.ask(ctx)
		if err != nil {
			return err
		}
		if !p.apply(ctx, reply.Payloads) {
			return nil
		}
	}
	return nil
}

func (p *payloads) ask(ctx context.Context) (*model.PayloadSyncReply, error) {
	a := p.a
	if !a.nc.IsConnected() {
		return nil, errors.New("not connected")
	}
	p.mu.Lock()
	req := model.PayloadSync{Device: a.o.DeviceID, Time: time.Now().UTC()}
	for _, h := range p.have {
		req.Have = append(req.Have, h)
	}
	p.mu.Unlock()
	s, err := model.Sign(a.o.Key, model.PurposePayloadSync, req)
	if err != nil {
		return nil, err
	}
	body, _ := json.Marshal(s)
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	m, err := a.nc.RequestWithContext(rctx, subjects.PayloadSyncFor(a.o.DeviceID), body)
	if err != nil {
		return nil, fmt.Errorf("ask for payloads: %w", err)
	}
	var r model.PayloadSyncReply
	if err := json.Unmarshal(m.Data, &r); err != nil {
		return nil, fmt.Errorf("payloads reply: %w", err)
	}
	if r.Error != "" {
		return nil, fmt.Errorf("payloads: %s", r.Error)
	}
	return &r, nil
}

// apply makes the payload dir hold exactly the payloads given; it reports
// whether what the device holds changed.
func (p *payloads) apply(ctx context.Context, list []model.Signed) bool {
	a := p.a
	want := map[string]bool{}
	changed := false
	for i := range list {
		var claimed model.Payload
		_ = list[i].Decode(&claimed)
		if model.CheckPayloadName(claimed.Name) != nil {
			a.log.Warn().Str("name", claimed.Name).Msg("payload with a bad name ignored")
			continue
		}
		want[claimed.Name] = true
		h := p.one(ctx, &list[i], claimed.Name)
		p.mu.Lock()
		if p.have[claimed.Name] != h {
			p.have[claimed.Name] = h
			changed = true
		}
		p.mu.Unlock()
	}
	p.mu.Lock()
	for name := range p.have {
		if want[name] {
			continue
		}
		// Withdrawn: the file goes.
		if err := os.Remove(filepath.Join(p.dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			a.log.Warn().Err(err).Str("payload", name).Msg("remove withdrawn payload")
			continue
		}
		a.log.Info().Str("payload", name).Msg("payload withdrawn")
		delete(p.have, name)
		changed = true
	}
	b, _ := json.Marshal(p.have)
	p.mu.Unlock()
	if changed {
		if err := accounts.WriteSecretFile(p.path, b); err != nil {
			a.log.Error().Err(err).Msg("save payload state")
		}
	}
	return changed
}

// one verifies, opens and writes one payload; it returns what the device
// holds of it.
func (p *payloads) one(ctx context.Context, s *model.Signed, name string) model.PayloadHave {
	a := p.a
	h := model.PayloadHave{Name: name}
	p.mu.Lock()
	prev := p.have[name]
	p.mu.Unlock()
	// Already written: nothing to open (unless the file went missing or
	// changed on disk).
	var pl model.Payload
	if s.Decode(&pl) == nil && prev.SHA256 != "" && prev.SHA256 == pl.SHA256 && fileHash(filepath.Join(p.dir, name)) == pl.SHA256 {
		return prev
	}
	if a.o.MDM.XKey == nil {
		h.Error = "this agent has no xkey to open payloads with"
		return h
	}
	pp, data, err := model.OpenPayload(s, a.o.DeviceID, a.o.ReleaseSigners, a.o.MDM.XKey)
	if err != nil {
		a.log.Warn().Err(err).Str("payload", name).Msg("payload refused; nothing written")
		h.Error = err.Error()
		return h
	}
	if err := writePayload(p.dir, pp, data); err != nil {
		a.log.Warn().Err(err).Str("payload", name).Msg("payload not written")
		h.Error = err.Error()
		return h
	}
	a.log.Info().Str("payload", name).Str("sha256", pp.SHA256).Msg("payload written")
	h.SHA256 = pp.SHA256
	if pp.Reload != "" {
		if act := a.o.MDM.Actions; act == nil {
			h.Error = "written, but this agent cannot reload " + pp.Reload
		} else if err := act.ReloadUnit(ctx, pp.Reload); err != nil {
			h.Error = "written, but reloading " + pp.Reload + " failed: " + err.Error()
		}
	}
	return h
}

func fileHash(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// writePayload writes data as dir/name atomically: a temporary file in the
// same dir gets the mode and owner first, then takes the name.
func writePayload(dir string, p *model.Payload, data []byte) error {
	uid, gid, err := payloadOwner(p)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("payload dir: %w", err)
	}
	tmp, err := os.CreateTemp(dir, "."+p.Name+".*")
	if err != nil {
		return fmt.Errorf("write payload %s: %w", p.Name, err)
	}
	defer os.Remove(tmp.Name())
	err = tmp.Chmod(fs.FileMode(p.Mode) & fs.ModePerm)
	if err == nil && (uid >= 0 || gid >= 0) {
		err = tmp.Chown(uid, gid)
	}
	if err == nil {
		_, err = tmp.Write(data)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), filepath.Join(dir, p.Name))
	}
	if err != nil {
		return fmt.Errorf("write payload %s: %w", p.Name, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// payloadOwner resolves the payload's owner and group (-1: unchanged).
func payloadOwner(p *model.Payload) (int, int, error) {
	uid, gid := -1, -1
	if p.Owner != "" {
		u, err := user.Lookup(p.Owner)
		if err != nil {
			return 0, 0, fmt.Errorf("payload %s: owner %q: %w", p.Name, p.Owner, err)
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
	}
	if p.Group != "" {
		g, err := user.LookupGroup(p.Group)
		if err != nil {
			return 0, 0, fmt.Errorf("payload %s: group %q: %w", p.Name, p.Group, err)
		}
		gid, _ = strconv.Atoi(g.Gid)
	}
	return uid, gid, nil
}

// subscribe wires the coordinator's trigger to kick, until stop.
func (p *payloads) subscribe() (stop func()) {
	a := p.a
	return a.inbox.handle(subjects.DevicePayloadsNotify(a.o.Site, a.o.DeviceID), func(*nats.Msg) { p.kick() })
}
