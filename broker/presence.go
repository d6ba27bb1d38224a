package broker

import (
	"encoding/json"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"fleet/subjects"
)

// Presence is an in-memory index of the FLEET account's connections by user
// key (for a device, its ID) and of when each device was last heard from.
// It is rebuilt from the server on start and kept by the system account's
// connect/disconnect advisories and by plain subscriptions on facts and
// events: no JetStream write per heartbeat (DESIGN §3 scale rules).
type Presence struct {
	mu sync.RWMutex
	// conns holds each user's open connections as "<server id>/<cid>", so
	// an event seen twice (advisory and seed) counts once.
	conns    map[string]map[string]struct{}
	lastSeen map[string]time.Time
	now      func() time.Time
}

func newPresence(now func() time.Time) *Presence {
	return &Presence{conns: map[string]map[string]struct{}{}, lastSeen: map[string]time.Time{}, now: now}
}

// Online reports whether user key id has an open connection.
func (p *Presence) Online(id string) bool {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return len(p.conns[id]) > 0
}

// LastSeen is when id last connected or sent facts or events (zero: not
// since this coordinator started).
func (p *Presence) LastSeen(id string) time.Time {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.lastSeen[id]
}

func (p *Presence) connected(user, conn string) {
	if user == "" {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	set := p.conns[user]
	if set == nil {
		set = map[string]struct{}{}
		p.conns[user] = set
	}
	set[conn] = struct{}{}
	p.lastSeen[user] = p.now()
}

func (p *Presence) disconnected(user, conn string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if set := p.conns[user]; set != nil {
		delete(set, conn)
		if len(set) == 0 {
			delete(p.conns, user)
		}
		// A device seen until now is last seen now.
		p.lastSeen[user] = p.now()
	}
}

func (p *Presence) touch(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lastSeen[id] = p.now()
}

func connKey(serverID string, cid uint64) string { return serverID + "/" + strconv.FormatUint(cid, 10) }

// startPresence subscribes to the advisories first and then seeds from the
// server's connection list, so no connection falls between the two.
func startPresence(c *Coordinator, s *services) (*Presence, error) {
	p := newPresence(s.now)
	acc := c.auth.FleetAccount()
	onConnect := func(m *nats.Msg) {
		var ev server.ConnectEventMsg
		if json.Unmarshal(m.Data, &ev) == nil {
			p.connected(ev.Client.User, connKey(ev.Server.ID, ev.Client.ID))
		}
	}
	onDisconnect := func(m *nats.Msg) {
		var ev server.DisconnectEventMsg
		if json.Unmarshal(m.Data, &ev) == nil {
			p.disconnected(ev.Client.User, connKey(ev.Server.ID, ev.Client.ID))
		}
	}
	onDevice := func(m *nats.Msg) {
		if id, ok := subjects.DeviceFromSubject(m.Subject); ok {
			p.touch(id)
		}
	}
	for _, sub := range []struct {
		nc   *nats.Conn
		subj string
		h    nats.MsgHandler
	}{
		{c.sys, subjects.AccountConnect(acc), onConnect},
		{c.sys, subjects.AccountDisconnect(acc), onDisconnect},
		{c.nc, subjects.AllFacts, onDevice},
		{c.nc, subjects.AllEvents, onDevice},
	} {
		ns, err := sub.nc.Subscribe(sub.subj, sub.h)
		if err != nil {
			return nil, fmt.Errorf("subscribe %s: %w", sub.subj, err)
		}
		s.subs = append(s.subs, ns)
	}
	if err := c.sys.Flush(); err != nil {
		return nil, fmt.Errorf("presence: %w", err)
	}
	const page = 1024
	for offset := 0; ; offset += page {
		cz, err := c.ns.Connz(&server.ConnzOptions{Account: acc, Username: true, Offset: offset, Limit: page})
		if err != nil {
			return nil, fmt.Errorf("presence: list connections: %w", err)
		}
		for _, ci := range cz.Conns {
			p.connected(ci.AuthorizedUser, connKey(cz.ID, ci.Cid))
		}
		if len(cz.Conns) < page {
			break
		}
	}
	return p, nil
}
