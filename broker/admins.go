package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"fleet/model"
	"fleet/subjects"
)

var adminNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$`)

// adminAdd records a new admin and issues its user JWT with the scoped key
// of its role. The caller made the key pair; only the public key travels.
func (s *services) adminAdd(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.AdminAdd
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	if !adminNameRE.MatchString(a.Name) {
		return nil, badRequest("admin name %q: use letters, digits, . _ @ - (at most 64)", a.Name)
	}
	role, err := subjects.ParseRole(a.Role)
	if err != nil || !slices.Contains(subjects.AdminRoles, role) {
		return nil, badRequest("role %q: an admin is an observer (dashboards), viewer, operator or owner", a.Role)
	}
	if !nkeys.IsValidPublicUserKey(a.Key) {
		return nil, badRequest("%q is not an nkey user public key", a.Key)
	}
	for _, g := range a.Groups {
		if err := model.CheckGroup(g); err != nil {
			return nil, badRequest("%v", err)
		}
	}
	if len(a.Groups) > 0 && role != subjects.RoleOperator {
		return nil, badRequest("--group limits operators; a %s is not limited to groups", role)
	}
	admins, err := s.allAdmins(ctx)
	if err != nil {
		return nil, err
	}
	for _, x := range admins {
		if x.Name == a.Name {
			return nil, conflict("an admin named %s exists already (remove it first)", a.Name)
		}
	}
	tok, err := s.c.auth.IssueUser(role, a.Key, a.Name, 0)
	if err != nil {
		return nil, badRequest("%v", err)
	}
	rec := model.Admin{Key: a.Key, Name: a.Name, Role: string(role), Groups: a.Groups, CreatedAt: s.now().UTC()}
	b, _ := json.Marshal(rec)
	if _, err := s.admins.Create(ctx, a.Key, b); err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) {
			return nil, conflict("key %s is already an admin", a.Key)
		}
		return nil, fmt.Errorf("record admin %s: %w", a.Name, err)
	}
	return model.AdminAdded{Admin: rec, JWT: tok}, nil
}

func (s *services) adminsList(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	q, err := listQuery(raw)
	if err != nil {
		return nil, err
	}
	admins, err := s.allAdmins(ctx)
	if err != nil {
		return nil, err
	}
	return pageOf(admins, func(a *model.Admin) string { return a.Name + "\x00" + a.Key }, q.Page, capList)
}

// adminRemove deletes an admin and revokes its key, so its creds stop
// working at once. The last owner cannot be removed.
func (s *services) adminRemove(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	var a model.AdminRef
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	admins, err := s.allAdmins(ctx)
	if err != nil {
		return nil, err
	}
	var target *model.Admin
	owners := 0
	for i, x := range admins {
		if x.Role == string(subjects.RoleOwner) {
			owners++
		}
		if x.Name == a.Ref || x.Key == a.Ref {
			target = &admins[i]
		}
	}
	if target == nil {
		return nil, notFound("no admin named %q (see fleet-admin admin ls)", a.Ref)
	}
	if target.Role == string(subjects.RoleOwner) && owners == 1 {
		return nil, conflict("%s is the last owner: add another owner first", target.Name)
	}
	if err := s.c.Revoke(ctx, target.Key); err != nil {
		return nil, fmt.Errorf("revoke admin %s: %w", target.Name, err)
	}
	if err := s.admins.Delete(ctx, target.Key); err != nil {
		return nil, fmt.Errorf("remove admin %s: %w", target.Name, err)
	}
	return target, nil
}

func (s *services) allAdmins(ctx context.Context) ([]model.Admin, error) {
	out := []model.Admin{}
	err := eachKey(ctx, s.admins, func(e jetstream.KeyValueEntry) {
		var a model.Admin
		if json.Unmarshal(e.Value(), &a) == nil {
			out = append(out, a)
		}
	})
	return out, err
}

// auditList reads one page of the audit stream, oldest first: from a start
// time on the first page, after the cursor's sequence on later ones. The
// records carry the signed requests verbatim so the client can verify them
// itself.
func (s *services) auditList(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var q model.AuditQuery
	if len(raw) > 0 {
		if err := decodeArgs(raw, &q); err != nil {
			return nil, err
		}
	}
	if q.Since < 0 {
		return nil, badRequest("--since must be positive")
	}
	after, err := decodeSeqCursor(q.Page.After)
	if err != nil {
		return nil, err
	}
	limit := pageLimit(q.Page, capAudit)
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{subjects.AllAudit}}
	switch {
	case after > 0:
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = after + 1
	case q.Since > 0:
		start := s.now().Add(-q.Since)
		cfg.DeliverPolicy = jetstream.DeliverByStartTimePolicy
		cfg.OptStartTime = &start
	}
	stream, err := s.c.js.Stream(ctx, subjects.StreamAudit)
	if err != nil {
		return nil, fmt.Errorf("audit stream: %w", err)
	}
	info, err := stream.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("audit stream: %w", err)
	}
	out := &model.PageOf[model.AuditRecord]{Items: []model.AuditRecord{}, Total: -1}
	if info.State.Msgs == 0 || (after > 0 && after >= info.State.LastSeq) {
		return out, nil
	}
	cons, err := stream.OrderedConsumer(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("read audit: %w", err)
	}
	size := 0
	var lastSeq, pending uint64
	for {
		batch, err := cons.Fetch(min(100, limit-len(out.Items)+1), jetstream.FetchMaxWait(300*time.Millisecond))
		if err != nil {
			return nil, fmt.Errorf("read audit: %w", err)
		}
		n := 0
		for m := range batch.Messages() {
			n++
			md, err := m.Metadata()
			if err != nil {
				return nil, fmt.Errorf("read audit: %w", err)
			}
			// A full page: the cursor is the last record on it.
			if len(out.Items) >= limit || (len(out.Items) > 0 && size+len(m.Data()) > maxPageBytes) {
				out.Next = seqCursor(md.Sequence.Stream - 1)
				return out, nil
			}
			var r model.AuditRecord
			if json.Unmarshal(m.Data(), &r) == nil {
				out.Items = append(out.Items, r)
				size += len(m.Data())
			}
			lastSeq, pending = md.Sequence.Stream, md.NumPending
			if pending == 0 {
				return out, nil
			}
		}
		if n == 0 {
			if pending > 0 { // more stored, but slow to come: go on next page
				out.Next = seqCursor(lastSeq)
			}
			return out, nil // nothing newer than the start
		}
	}
}
