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
// connect/disconnect advisories of the hub's own servers and by the
// device's verified reports: no JetStream write per heartbeat (DESIGN §3
// scale rules).
//
// A device behind a site's leaf node is invisible to the hub's advisories
// (the hub sees the leaf link), and a site may not report connects: its
// word would let a rogue site show any device online. Such a device counts
// as online while its signed reports keep coming (within reportOnline).
type Presence struct {
	mu sync.RWMutex
	// conns holds each user's open connections as "<server id>/<cid>", so
	// an event seen twice (advisory and seed) counts once.
	conns    map[string]map[string]struct{}
	lastSeen map[string]time.Time
	// lastReport is when each device's last verified report came; gone
	// when the hub saw it disconnect since.
	lastReport map[string]time.Time
	now        func() time.Time
}

// reportOnline is how long a device without a connection to the hub counts
// as online after a verified report: a little over two facts intervals.
const reportOnline = 2*factsInterval + 30*time.Second

func newPresence(now func() time.Time) *Presence {
	return &Presence{conns: map[string]map[string]struct{}{}, lastSeen: map[string]time.Time{},
		lastReport: map[string]time.Time{}, now: now}
}

// Online reports whether user key id has an open connection to the hub, or
// (a device behind a leaf) sent a verified report lately.
func (p *Presence) Online(id string) bool {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if len(p.conns[id]) > 0 {
		return true
	}
	at, ok := p.lastReport[id]
	return ok && p.now().Sub(at) < reportOnline
}

// reported records a verified report of device id.
func (p *Presence) reported(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	p.lastSeen[id] = now
	p.lastReport[id] = now
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
		delete(p.lastReport, user)
	}
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
	for _, sub := range []struct {
		nc   *nats.Conn
		subj string
		h    nats.MsgHandler
	}{
		{c.sys, subjects.AccountConnect(acc), onConnect},
		{c.sys, subjects.AccountDisconnect(acc), onDisconnect},
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
	if c.cfg.Clustered() {
		// The other coordinators' connections too: a node that joins late
		// knows who is online on the others at once, not at their next
		// report. Advisories since the subscription above keep it current.
		if err := seedClusterPresence(c, p, acc); err != nil {
			c.log.Warn().Err(err).Msg("presence: the other coordinators' connections are not known yet")
		}
	}
	return p, nil
}

// seedClusterPresence asks every server of the cluster for its FLEET
// connections ($SYS.REQ.SERVER.PING.CONNZ) and records them. Sites' leaf
// nodes do not hear the request (their system link carries account updates
// only), so only the hub's servers answer.
func seedClusterPresence(c *Coordinator, p *Presence, acc string) error {
	inbox := c.sys.NewRespInbox()
	sub, err := c.sys.SubscribeSync(inbox)
	if err != nil {
		return err
	}
	defer func() { _ = sub.Unsubscribe() }()
	req, _ := json.Marshal(server.ConnzEventOptions{ConnzOptions: server.ConnzOptions{Account: acc, Username: true, Limit: 1 << 20}})
	if err := c.sys.PublishRequest("$SYS.REQ.SERVER.PING.CONNZ", inbox, req); err != nil {
		return err
	}
	deadline := time.Now().Add(time.Second)
	for {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			return nil // every server that answers in time has
		}
		var resp struct {
			Server *server.ServerInfo `json:"server"`
			Data   *server.Connz      `json:"data"`
		}
		if json.Unmarshal(m.Data, &resp) != nil || resp.Server == nil || resp.Data == nil {
			continue
		}
		for _, ci := range resp.Data.Conns {
			p.connected(ci.AuthorizedUser, connKey(resp.Server.ID, ci.Cid))
		}
	}
}
