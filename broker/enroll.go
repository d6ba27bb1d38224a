package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"fleet/model"
	"fleet/subjects"
)

// enrollSkew bounds the device's clock in an enrollment request. It is
// wider than the admin API's: a fresh install may not have synced its clock
// yet, and a replayed request only returns a JWT for a key the replayer
// does not hold.
const enrollSkew = time.Hour

func (s *services) startEnroll() error {
	// A queue subscription: in a cluster one coordinator answers each
	// request (the admin API's micro endpoints are in a queue group too).
	sub, err := s.c.fc.QueueSubscribe(subjects.Enroll, subjects.CoordinatorQueue, func(m *nats.Msg) {
		// Only a device inbox can be answered; anything else is dropped
		// before any work.
		if _, _, ok := subjects.DeviceInboxOf(m.Reply); !ok {
			s.drop("enroll", dropReply, m)
			return
		}
		// Handle concurrently (bounded): the token's revision check, not
		// message order, keeps uses from being overspent.
		if !s.begin() {
			return
		}
		s.enrollSem <- struct{}{}
		go func() {
			defer func() { <-s.enrollSem; s.wg.Done() }()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			resp, ok := s.enroll(ctx, m.Data, m.Reply)
			if !ok {
				s.drop("enroll", dropReply, m)
				return
			}
			b, _ := json.Marshal(resp)
			_ = s.c.fc.Publish(m.Reply, b)
		}()
	})
	if err != nil {
		return fmt.Errorf("subscribe %s: %w", subjects.Enroll, err)
	}
	s.subs = append(s.subs, sub)
	return nil
}

// enroll answers one enrollment request, or reports false when the reply
// subject is not the requester's own inbox: the token's bearer inbox, or
// (a device asking whether it was approved) the device's own. Every
// refusal leaves the buckets as they were.
func (s *services) enroll(ctx context.Context, data []byte, reply string) (model.EnrollResponse, bool) {
	d, err := s.enrollDevice(ctx, data, reply)
	if errors.Is(err, errNotOwnInbox) {
		return model.EnrollResponse{}, false
	}
	if err != nil {
		var ae *apiError
		if errors.As(err, &ae) {
			s.log.Info().Str("reason", ae.msg).Msg("enrollment refused")
			return model.EnrollResponse{Error: ae.msg, Code: ae.code}, true
		}
		s.log.Error().Err(err).Msg("enrollment failed")
		return model.EnrollResponse{Error: "the coordinator could not enrol the device: " + err.Error(), Code: model.CodeInternal}, true
	}
	// A pending device gets creds that can only ask again.
	role := subjects.RoleAgent
	if d.Status == model.DevicePending {
		role = subjects.RolePending
	}
	tok, err := s.c.auth.IssueSiteUser(role, d.ID, d.Name, d.Site, 0)
	if err != nil {
		return model.EnrollResponse{Error: err.Error(), Code: model.CodeInternal}, true
	}
	s.log.Info().Str("device", d.ID).Str("name", d.Name).Str("status", string(d.Status)).Msg("device enrolled")
	return model.EnrollResponse{JWT: tok, Status: d.Status}, true
}

// errNotOwnInbox: the request's reply subject is not the requester's inbox.
var errNotOwnInbox = errors.New("reply subject is not the requester's own inbox")

func (s *services) enrollDevice(ctx context.Context, data []byte, reply string) (*model.Device, error) {
	key, req, err := model.ParseEnrollRequest(data)
	if err != nil {
		if errors.Is(err, model.ErrBadSignature) || errors.Is(err, model.ErrUnsigned) {
			return nil, refused("%v: the request must be signed by the key being enrolled", err)
		}
		return nil, badRequest("%v", err)
	}
	if skew := s.now().Sub(req.Time); skew > enrollSkew || skew < -enrollSkew {
		return nil, refused("the device clock is %s off the coordinator's: set the clock (NTP) and retry", skew.Round(time.Second))
	}
	if req.TokenID == "" {
		return s.approvalCheck(ctx, key, reply)
	}
	if !model.ValidTokenID(req.TokenID) {
		return nil, refused("unknown enrollment token")
	}
	tok, err := s.token(ctx, req.TokenID)
	if err != nil {
		return nil, err
	}
	// Unknown and wrong-secret tokens get the same answer, so the reply
	// does not tell which token ids exist.
	if tok == nil || !tok.matches(req.Secret) {
		return nil, refused("unknown enrollment token: check it, or create a new one with fleet-admin token create")
	}
	site := tok.Site
	if site == "" {
		site = subjects.DefaultSite
	}
	if !subjects.InInbox(reply, subjects.DeviceInboxPrefix(site, tok.BearerKey)) &&
		!subjects.InInbox(reply, subjects.DeviceInboxPrefix(site, key)) {
		return nil, errNotOwnInbox
	}
	if tok.Revoked {
		return nil, refused("enrollment token %s was revoked: create a new one with fleet-admin token create", tok.ID)
	}
	// A key no JWT can be issued for never becomes a device or spends a
	// use: checked before anything is recorded.
	if _, err := s.c.auth.CheckSiteUser(subjects.RoleAgent, key, site); err != nil {
		return nil, badRequest("device key %s: %v", key, err)
	}
	if revoked, err := s.c.revokedKey(ctx, key); err != nil {
		return nil, err
	} else if revoked {
		return nil, refused("device key %s is revoked: a revoked device enrols again only with a new key (remove agent.nk from the state dir) and a new token", key)
	}
	for range 3 {
		d, _, err := s.getDevice(ctx, key)
		var ae *apiError
		if err != nil && !(errors.As(err, &ae) && ae.code == model.CodeNotFound) {
			return nil, err
		}
		if d != nil {
			return s.reenroll(d, tok)
		}
		if !s.now().Before(tok.ExpiresAt) {
			return nil, refused("enrollment token %s expired at %s: create a new one", tok.ID, tok.ExpiresAt.Format(time.RFC3339))
		}
		if tok.Uses <= 0 {
			return nil, refused("enrollment token %s is used up: create a new one or one with more --uses", tok.ID)
		}
		d = &model.Device{
			ID: key, Name: req.Hostname, Groups: tok.Groups, Site: site, Status: model.DeviceActive,
			XKey: req.XKey, EnrolledAt: s.now().UTC(), TokenID: tok.ID,
		}
		// Two devices with one host name (a reinstall, a cloned image)
		// are told apart: the newcomer is shown as name-2, name-3, ...
		if name := s.c.index.nameFor(req.Hostname); name != req.Hostname {
			d.Hostname = req.Hostname
			d.Name = name
			s.log.Warn().Str("device", key).Str("hostname", req.Hostname).Str("shown_as", d.Name).
				Msg("a device enrolled with a host name another device already has; it is shown under another name")
		}
		if tok.Approval {
			d.Status = model.DevicePending
		}
		// Record first, then spend: a concurrent request for the same key
		// loses the create and takes the idempotent path above, so one key
		// never spends two uses; a failed spend removes the record again.
		b, _ := json.Marshal(d)
		rev, err := s.devices.Create(ctx, key, b)
		if errors.Is(err, jetstream.ErrKeyExists) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("record device: %w", err)
		}
		if err := s.spend(ctx, tok.ID); err != nil {
			if derr := s.devices.Delete(ctx, key, jetstream.LastRevision(rev)); derr != nil {
				s.log.Error().Err(derr).Str("device", key).Msg("could not undo a device record after a failed enrollment")
			}
			return nil, err
		}
		return d, nil
	}
	return nil, &apiError{model.CodeInternal, "device record is busy; retry"}
}

// approvalCheck answers a recorded device that asks, without a token,
// whether it was approved: its signature proves the key, and the answer
// goes only to its own inbox.
func (s *services) approvalCheck(ctx context.Context, key, reply string) (*model.Device, error) {
	d, _, err := s.getDevice(ctx, key)
	var ae *apiError
	if errors.As(err, &ae) && ae.code == model.CodeNotFound {
		if _, rkey, ok := subjects.DeviceInboxOf(reply); !ok || rkey != key {
			return nil, errNotOwnInbox
		}
		return nil, refused("device %s is not enrolled: enrol with a token", key)
	}
	if err != nil {
		return nil, err
	}
	if !subjects.InInbox(reply, subjects.DeviceInboxPrefix(siteOf(d), key)) {
		return nil, errNotOwnInbox
	}
	if d.Status == model.DeviceRevoked {
		return nil, refused("device %s is revoked: enrol with a new key and a new token", d.ID)
	}
	return d, nil
}

// reenroll answers a device that is already recorded: the same key with
// the same token gets its credentials again (a retry after a lost reply or
// a crash) without spending a use.
func (s *services) reenroll(d *model.Device, tok *tokenRecord) (*model.Device, error) {
	if d.Status == model.DeviceRevoked {
		return nil, refused("device %s is revoked: enrol with a new key and a new token", d.ID)
	}
	if d.TokenID != tok.ID {
		return nil, refused("device key %s is already enrolled with another token", d.ID)
	}
	return d, nil
}

// spend takes one use of token id, refusing when none is left. The
// enrolments waiting on one token at a moment are spent together, with one
// compare-and-set: a fleet enrolling with one token costs a write per
// handful of devices, not a write (and a retry storm) per device.
func (s *services) spend(_ context.Context, id string) error {
	v, _ := s.spenders.LoadOrStore(id, &spender{})
	sp := v.(*spender)
	ch := make(chan error, 1)
	sp.mu.Lock()
	sp.pending = append(sp.pending, ch)
	if !sp.running {
		sp.running = true
		go s.spendBatches(id, sp)
	}
	sp.mu.Unlock()
	// The batch is bounded by its own deadline; waiting for it (rather
	// than the request's) keeps a spent use from going unaccounted.
	return <-ch
}

// spender gathers one token's spends.
type spender struct {
	mu      sync.Mutex
	pending []chan error
	running bool
}

// spendBatches spends what is pending on sp, a batch at a time, until
// nothing is.
func (s *services) spendBatches(id string, sp *spender) {
	for {
		sp.mu.Lock()
		batch := sp.pending
		sp.pending = nil
		if len(batch) == 0 {
			sp.running = false
			sp.mu.Unlock()
			return
		}
		sp.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		granted := 0
		err := s.updateToken(ctx, id, func(t *tokenRecord) error {
			if t.Revoked {
				return refused("enrollment token %s was revoked", id)
			}
			granted = min(len(batch), t.Uses)
			if granted == 0 {
				return refused("enrollment token %s is used up: create a new one or one with more --uses", id)
			}
			t.Uses -= granted
			t.Used += granted
			return nil
		})
		cancel()
		for i, ch := range batch {
			switch {
			case err != nil:
				ch <- err
			case i < granted:
				ch <- nil
			default:
				ch <- refused("enrollment token %s is used up: create a new one or one with more --uses", id)
			}
		}
	}
}

// token reads token id; a missing token is nil without error.
func (s *services) token(ctx context.Context, id string) (*tokenRecord, error) {
	e, err := s.tokens.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read token: %w", err)
	}
	var t tokenRecord
	if err := json.Unmarshal(e.Value(), &t); err != nil {
		return nil, fmt.Errorf("token record %s is damaged: %w", id, err)
	}
	return &t, nil
}
