package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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
	sub, err := s.c.nc.QueueSubscribe(subjects.Enroll, subjects.CoordinatorQueue, func(m *nats.Msg) {
		// Handle concurrently (bounded): the token's revision check, not
		// message order, keeps uses from being overspent.
		s.enrollSem <- struct{}{}
		s.wg.Add(1)
		go func() {
			defer func() { <-s.enrollSem; s.wg.Done() }()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			resp := s.enroll(ctx, m.Data)
			b, _ := json.Marshal(resp)
			_ = m.Respond(b)
		}()
	})
	if err != nil {
		return fmt.Errorf("subscribe %s: %w", subjects.Enroll, err)
	}
	s.subs = append(s.subs, sub)
	return nil
}

// enroll answers one enrollment request. Every refusal leaves the buckets
// as they were.
func (s *services) enroll(ctx context.Context, data []byte) model.EnrollResponse {
	d, err := s.enrollDevice(ctx, data)
	if err != nil {
		var ae *apiError
		if errors.As(err, &ae) {
			s.log.Info().Str("reason", ae.msg).Msg("enrollment refused")
			return model.EnrollResponse{Error: ae.msg, Code: ae.code}
		}
		s.log.Error().Err(err).Msg("enrollment failed")
		return model.EnrollResponse{Error: "the coordinator could not enrol the device: " + err.Error(), Code: model.CodeInternal}
	}
	tok, err := s.c.auth.IssueUser(subjects.RoleAgent, d.ID, d.Name, 0)
	if err != nil {
		return model.EnrollResponse{Error: err.Error(), Code: model.CodeInternal}
	}
	s.log.Info().Str("device", d.ID).Str("name", d.Name).Str("status", string(d.Status)).Msg("device enrolled")
	return model.EnrollResponse{JWT: tok, Status: d.Status}
}

func (s *services) enrollDevice(ctx context.Context, data []byte) (*model.Device, error) {
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
	if tok.Revoked {
		return nil, refused("enrollment token %s was revoked: create a new one with fleet-admin token create", tok.ID)
	}
	// The JWT is issued before anything is recorded: a key it cannot be
	// issued for never becomes a device or spends a use.
	if _, err := s.c.auth.IssueUser(subjects.RoleAgent, key, req.Hostname, 0); err != nil {
		return nil, badRequest("device key %s: %v", key, err)
	}
	if s.c.auth.IsRevoked(key) {
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
			ID: key, Name: req.Hostname, Groups: tok.Groups, Status: model.DeviceActive,
			XKey: req.XKey, EnrolledAt: s.now().UTC(), TokenID: tok.ID,
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

// spend takes one use of token id, refusing when none is left.
func (s *services) spend(ctx context.Context, id string) error {
	return s.updateToken(ctx, id, func(t *tokenRecord) error {
		if t.Revoked {
			return refused("enrollment token %s was revoked", id)
		}
		if t.Uses <= 0 {
			return refused("enrollment token %s is used up: create a new one or one with more --uses", id)
		}
		t.Uses--
		t.Used++
		return nil
	})
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
