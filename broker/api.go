package broker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"fleet/accounts"
	"fleet/model"
	"fleet/subjects"
)

// apiError is a refusal or failure the caller can act on; its code tells
// the client whether to fix the request, its rights, or retry.
type apiError struct {
	code, msg string
}

func (e *apiError) Error() string { return e.msg }

func badRequest(format string, a ...any) error {
	return &apiError{model.CodeBadRequest, fmt.Sprintf(format, a...)}
}
func refused(format string, a ...any) error {
	return &apiError{model.CodeRefused, fmt.Sprintf(format, a...)}
}
func notFound(format string, a ...any) error {
	return &apiError{model.CodeNotFound, fmt.Sprintf(format, a...)}
}
func conflict(format string, a ...any) error {
	return &apiError{model.CodeConflict, fmt.Sprintf(format, a...)}
}

// Refused requests each admin, and all non-admins together, may add to the
// audit: a burst, then one a second.
const (
	auditRefusalRate  = 1.0
	auditRefusalBurst = 60
)

// requestKey carries the signed request into a handler's context: a deploy
// keeps it, so each device can check an admin asked for its desired state.
type requestKey struct{}

// signedRequest is the verified signed request being served (nil outside
// a handler).
func signedRequest(ctx context.Context) *model.Signed {
	b, _ := ctx.Value(requestKey{}).([]byte)
	var s model.Signed
	if json.Unmarshal(b, &s) != nil {
		return nil
	}
	return &s
}

// apiHandler runs a verb for an authenticated admin with its decoded args.
type apiHandler func(ctx context.Context, who *model.Admin, args json.RawMessage) (any, error)

type apiVerb struct {
	name  string
	write bool
	// role is the least role that may call the verb.
	role subjects.Role
	h    apiHandler
}

func (s *services) verbs() []apiVerb {
	return []apiVerb{
		{subjects.VerbDevices, false, subjects.RoleObserver, s.devicesList},
		{subjects.VerbDevice, false, subjects.RoleViewer, s.deviceShow},
		{subjects.VerbTokens, false, subjects.RoleOwner, s.tokensList},
		{subjects.VerbTokenCreate, true, subjects.RoleOwner, s.tokenCreate},
		{subjects.VerbTokenRevoke, true, subjects.RoleOwner, s.tokenRevoke},
		{subjects.VerbDeviceApprove, true, subjects.RoleOperator, s.deviceApprove},
		{subjects.VerbDeviceRevoke, true, subjects.RoleOperator, s.deviceRevoke},
		{subjects.VerbDeviceGroups, true, subjects.RoleOperator, s.deviceGroups},
		{subjects.VerbDevicePin, true, subjects.RoleOperator, s.devicePin},
		{subjects.VerbGroups, false, subjects.RoleViewer, s.groupsList},
		{subjects.VerbGroup, false, subjects.RoleViewer, s.groupShow},
		{subjects.VerbReleases, false, subjects.RoleViewer, s.releasesList},
		{subjects.VerbRelease, false, subjects.RoleViewer, s.releaseShow},
		{subjects.VerbReleaseCreate, true, subjects.RoleOperator, s.releaseCreate},
		{subjects.VerbRollouts, false, subjects.RoleViewer, s.rolloutsList},
		{subjects.VerbRollout, false, subjects.RoleViewer, s.rolloutShow},
		{subjects.VerbDeploy, true, subjects.RoleOperator, s.deploy},
		{subjects.VerbDeployPreview, false, subjects.RoleOperator, s.deployPreview},
		{subjects.VerbRolloutAction, true, subjects.RoleOperator, s.rolloutAction},
		{subjects.VerbAdmins, false, subjects.RoleViewer, s.adminsList},
		{subjects.VerbAdminAdd, true, subjects.RoleOwner, s.adminAdd},
		{subjects.VerbAdminRemove, true, subjects.RoleOwner, s.adminRemove},
		{subjects.VerbAudit, false, subjects.RoleOperator, s.auditList},
		{subjects.VerbLeafConfig, true, subjects.RoleOwner, s.leafConfig},
		{subjects.VerbLeafRevoke, true, subjects.RoleOwner, s.leafRevoke},
		{subjects.VerbStatus, false, subjects.RoleObserver, s.status},
		{subjects.VerbFacts, false, subjects.RoleObserver, s.facts},
	}
}

// testVerbs are extra verbs tests add to the API (nil otherwise).
var testVerbs func(s *services) []apiVerb

// roleRank orders the admin roles; a role may call what a lower one may.
// An observer (dashboards) reads the fleet's state: devices, status, facts.
func roleRank(r subjects.Role) int {
	switch r {
	case subjects.RoleObserver:
		return 1
	case subjects.RoleViewer:
		return 2
	case subjects.RoleOperator:
		return 3
	case subjects.RoleOwner:
		return 4
	}
	return 0
}

func (s *services) startAPI() error {
	svc, err := micro.AddService(s.c.fc, micro.Config{
		Name:        subjects.APIService,
		Version:     "0.1.0",
		Description: "fleet admin API: signed requests, role-checked, audited",
	})
	if err != nil {
		return fmt.Errorf("admin API service: %w", err)
	}
	s.api = svc
	verbs := append(append(s.verbs(), s.mdmVerbs()...), s.cacheVerbs()...)
	if testVerbs != nil {
		verbs = append(verbs, testVerbs(s)...)
	}
	for _, v := range verbs {
		subj := subjects.APIReadVerb(v.name)
		if v.write {
			subj = subjects.APIWriteVerb(v.name)
		}
		v := v
		err := svc.AddEndpoint(v.name, micro.HandlerFunc(func(r micro.Request) {
			if !s.begin() {
				return
			}
			defer s.wg.Done()
			// Answer only into an admin's own inbox, and (once the
			// request is parsed) only the signer's: a reply subject
			// anywhere else is dropped before any work.
			key, ok := subjects.AdminInboxKey(r.Reply())
			if !ok {
				s.dropped.WithLabelValues("api", dropReply).Inc()
				return
			}
			resp, ok := s.serve(v, r.Data(), key)
			if !ok {
				s.dropped.WithLabelValues("api", dropReply).Inc()
				return
			}
			s.respond(r, v.name, resp)
		}), micro.WithEndpointSubject(subj))
		if err != nil {
			return fmt.Errorf("admin API verb %s: %w", v.name, err)
		}
	}
	return nil
}

// respond sends resp. A reply the connection cannot carry (larger than the
// max payload) or that fails to send is logged and answered with an
// explicit error, so the caller is not left waiting for its timeout.
func (s *services) respond(r micro.Request, verb string, resp model.Response) {
	b, err := json.Marshal(resp)
	if err != nil {
		b, _ = json.Marshal(model.Response{Error: "encode reply: " + err.Error(), Code: model.CodeInternal})
	}
	limit := s.c.fc.MaxPayload()
	if int64(len(b)) > limit {
		err = fmt.Errorf("reply too large: %d bytes, more than the %d a message may carry; page with --limit", len(b), limit)
	} else if err = r.Respond(b); err == nil {
		return
	} else if strings.Contains(err.Error(), nats.ErrMaxPayload.Error()) {
		err = fmt.Errorf("reply too large: %d bytes (%v); page with --limit", len(b), err)
	} else {
		err = fmt.Errorf("reply could not be sent: %w", err)
	}
	s.log.Error().Err(err).Str("verb", verb).Int("bytes", len(b)).Msg("admin API reply not sent; answering with an error")
	eb, _ := json.Marshal(model.Response{Error: verb + ": " + err.Error(), Code: model.CodeInternal})
	if err := r.Respond(eb); err != nil {
		s.log.Error().Err(err).Str("verb", verb).Msg("admin API error reply not sent either")
	}
}

// serve checks one request and runs it: signature, reply inbox, verb,
// freshness, replay, admin and role, in that order, so nothing
// unauthenticated reaches the nonce cache or the buckets. Writes and
// refusals go to the audit stream. It reports false for a request signed
// by another key than the inbox it asks to be answered in (dropped).
func (s *services) serve(v apiVerb, data []byte, replyKey string) (model.Response, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rec := model.AuditRecord{Time: s.now().UTC(), Verb: v.name}
	who, args, err := s.authenticate(ctx, v, data, replyKey, &rec)
	if errors.Is(err, errNotOwnInbox) {
		return model.Response{}, false
	}
	var out any
	if err == nil {
		out, err = v.h(context.WithValue(ctx, requestKey{}, data), who, args)
		var ae *apiError
		if errors.As(err, &ae) && ae.code == model.CodeRefused {
			rec.Result = model.AuditRefused // e.g. an operator outside its groups
		} else if err != nil {
			rec.Result = model.AuditError
		} else {
			rec.Result = model.AuditOK
		}
	} else {
		rec.Result = model.AuditRefused
	}
	if err != nil {
		rec.Error = err.Error()
	}
	if rec.Result == model.AuditRefused {
		// A refusal keeps only what identifies the request: anyone may
		// send refused requests, and the audit must not be theirs to fill.
		sum := sha256.Sum256(data)
		rec.RequestHash, rec.RequestBytes = hex.EncodeToString(sum[:]), len(data)
		// Non-admins share one bucket: keys cost nothing to make.
		if s.auditLimiter.allow(rec.Admin) {
			s.audit(ctx, rec)
		} else {
			s.auditSuppressed.Inc()
		}
	} else if v.write {
		rec.Request = auditRequest(data)
		s.audit(ctx, rec)
	}
	if err != nil {
		var ae *apiError
		if errors.As(err, &ae) {
			return model.Response{Error: ae.msg, Code: ae.code}, true
		}
		s.log.Error().Err(err).Str("verb", v.name).Msg("admin API request failed")
		return model.Response{Error: err.Error(), Code: model.CodeInternal}, true
	}
	b, err := json.Marshal(out)
	if err != nil {
		return model.Response{Error: "encode reply: " + err.Error(), Code: model.CodeInternal}, true
	}
	return model.Response{Data: b}, true
}

func (s *services) authenticate(ctx context.Context, v apiVerb, data []byte, replyKey string, rec *model.AuditRecord) (*model.Admin, json.RawMessage, error) {
	env, req, err := model.ParseEnvelope(data)
	if env != nil && err == nil {
		if env.Signer != replyKey {
			return nil, nil, errNotOwnInbox
		}
		rec.Signer = env.Signer
	}
	if err != nil {
		return nil, nil, refused("%v (sign requests with fleet-admin, or model.Sign with purpose %s)", err, model.PurposeAPI)
	}
	if req.Verb != v.name {
		return nil, nil, refused("request is signed for verb %q but was sent to %q", req.Verb, v.name)
	}
	if skew := s.now().Sub(req.Time); skew > model.MaxSkew || skew < -model.MaxSkew {
		return nil, nil, refused("request time %s is %s off the coordinator's clock (more than %s): fix this machine's clock (NTP) and retry",
			req.Time.UTC().Format(time.RFC3339), skew.Round(time.Second), model.MaxSkew)
	}
	if err := s.seen(ctx, env.Signer, req.Nonce); err != nil {
		return nil, nil, err
	}
	who, err := s.admin(ctx, env.Signer)
	if err != nil {
		return nil, nil, err
	}
	rec.Admin, rec.Role = who.Name, who.Role
	role, err := subjects.ParseRole(who.Role)
	if err != nil || roleRank(role) < roleRank(v.role) {
		return nil, nil, refused("admin %s (role %s) may not call %s: it needs role %s (ask an owner)", who.Name, who.Role, v.name, v.role)
	}
	return who, req.Args, nil
}

// admin looks up the signer in fleet_admins, the authority on roles.
func (s *services) admin(ctx context.Context, key string) (*model.Admin, error) {
	e, err := s.admins.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, refused("key %s is not an admin of this fleet (ask an owner to add it)", key)
	}
	if err != nil {
		return nil, fmt.Errorf("look up admin %s: %w", key, err)
	}
	var a model.Admin
	if err := json.Unmarshal(e.Value(), &a); err != nil {
		return nil, fmt.Errorf("admin record %s is damaged: %w", key, err)
	}
	return &a, nil
}

// audit appends rec to FLEET_AUDIT, chained to the entry before it. A
// failed append is logged: the request has already taken effect.
//
// The append expects the stream's last sequence to be the one whose hash
// it names, so two coordinators appending at once cannot fork the chain:
// the one that lost reads the new tail and tries again.
func (s *services) audit(ctx context.Context, rec model.AuditRecord) {
	s.auditMu.Lock()
	defer s.auditMu.Unlock()
	var err error
	for range 10 {
		if !s.auditTailKnown {
			if s.auditSeq, s.auditPrev, err = s.readAuditTail(ctx); err != nil {
				break
			}
			s.auditTailKnown = true
		}
		rec.Prev = s.auditPrev
		var ack *jetstream.PubAck
		ack, err = s.c.js.Publish(ctx, subjects.AuditSubject(rec.Verb), mustJSON(rec), jetstream.WithExpectLastSequence(s.auditSeq))
		if err == nil {
			s.auditSeq, s.auditPrev = ack.Sequence, model.AuditHash(rec)
			return
		}
		s.auditTailKnown = false // another coordinator appended: read again
		if !isWrongRevision(err) {
			break
		}
	}
	s.log.Error().Err(err).Str("verb", rec.Verb).Str("result", string(rec.Result)).Msg("audit append failed")
}

// readAuditTail returns the audit stream's last sequence and the hash of
// its entry (0 and "" when empty).
func (s *services) readAuditTail(ctx context.Context) (uint64, string, error) {
	st, err := s.c.js.Stream(ctx, subjects.StreamAudit)
	if err != nil {
		return 0, "", fmt.Errorf("audit stream: %w", err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return 0, "", fmt.Errorf("audit stream: %w", err)
	}
	if info.State.LastSeq == 0 {
		return 0, "", nil
	}
	m, err := st.GetMsg(ctx, info.State.LastSeq)
	if err != nil {
		return 0, "", fmt.Errorf("last audit entry: %w", err)
	}
	var last model.AuditRecord
	if err := json.Unmarshal(m.Data, &last); err != nil {
		return 0, "", fmt.Errorf("last audit entry %d is damaged: %w", info.State.LastSeq, err)
	}
	return info.State.LastSeq, model.AuditHash(last), nil
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

// auditRequest keeps the signed request verbatim when it is JSON of sane
// size, so the audit trail can be verified later; otherwise a note.
func auditRequest(data []byte) json.RawMessage {
	if len(data) <= 64<<10 && json.Valid(data) {
		return json.RawMessage(data)
	}
	b, _ := json.Marshal(fmt.Sprintf("<%d bytes, not JSON or too large>", len(data)))
	return b
}

// registerOwner records the owner of DIR/admin.creds in fleet_admins on the
// first start, so the creds init wrote can sign requests.
func (s *services) registerOwner(ctx context.Context) error {
	p := filepath.Join(s.c.cfg.DataDir, accounts.AdminCredsFile)
	cr, err := accounts.ReadCreds(p)
	if errors.Is(err, os.ErrNotExist) {
		s.log.Info().Str("creds", p).Msg("no first-owner creds in the data dir; admins come from fleet_admins only")
		return nil
	}
	if err != nil {
		return err
	}
	// Only into an empty bucket: an owner removed later stays removed.
	admins, err := s.allAdmins(ctx)
	if err != nil {
		return err
	}
	if len(admins) > 0 {
		return nil
	}
	b, _ := json.Marshal(model.Admin{Key: cr.PublicKey(), Name: "owner", Role: string(subjects.RoleOwner), CreatedAt: s.now().UTC()})
	if _, err := s.admins.Create(ctx, cr.PublicKey(), b); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
		return fmt.Errorf("register the first owner: %w", err)
	}
	return nil
}

// seen records a request's nonce, or refuses it as a replay. The record
// lives in a KV bucket (kv.Create either makes it or finds it), so a replay
// is refused after a restart and on any coordinator of a cluster; its TTL
// outlasts the freshness window, after which the time check refuses it.
func (s *services) seen(ctx context.Context, signer, nonce string) error {
	sum := sha256.Sum256([]byte(signer + "/" + nonce))
	if _, err := s.nonces.Create(ctx, hex.EncodeToString(sum[:]), []byte{1}); err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) {
			return refused("request was already received (replayed nonce): send a new request")
		}
		return fmt.Errorf("record request nonce: %w", err)
	}
	return nil
}

// isNotFound reports whether err is the API's "not found".
func isNotFound(err error) bool {
	var ae *apiError
	return errors.As(err, &ae) && ae.code == model.CodeNotFound
}
