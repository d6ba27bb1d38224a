package admin

import (
	"context"
	"fmt"
	"time"

	"fleet/model"
	"fleet/subjects"
)

// The coordinator answers listings a page at a time (model.Page); these
// helpers fetch every page, so commands work whatever the fleet's size.

// EachPage calls fetch with the page to get, starting from the first, until
// fetch returns an empty next cursor. Each call is its own request, bounded
// by the client's Timeout when ctx has no deadline.
func (c *Client) EachPage(ctx context.Context, verb string, fetch func(ctx context.Context, p model.Page) (next string, err error)) error {
	p := model.Page{Limit: c.PageSize}
	for {
		next, err := fetch(ctx, p)
		if err != nil {
			return err
		}
		if next == "" {
			return nil
		}
		if next == p.After {
			return fmt.Errorf("%s: the coordinator answered the same page cursor twice", verb)
		}
		p.After = next
	}
}

// ListAll fetches every page of a listing verb whose reply is a
// model.PageOf[T]; args builds the request of one page.
func ListAll[T any](ctx context.Context, c *Client, verb string, args func(model.Page) any) ([]T, error) {
	out := []T{}
	err := c.EachPage(ctx, verb, func(ctx context.Context, p model.Page) (string, error) {
		var page model.PageOf[T]
		if err := c.Call(ctx, verb, false, args(p), &page); err != nil {
			return "", err
		}
		out = append(out, page.Items...)
		return page.Next, nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

func listQuery(p model.Page) any { return model.ListQuery{Page: p} }

// Admins lists every admin, by name.
func (c *Client) Admins(ctx context.Context) ([]model.Admin, error) {
	return ListAll[model.Admin](ctx, c, subjects.VerbAdmins, listQuery)
}

// Releases lists every release, oldest first.
func (c *Client) Releases(ctx context.Context) ([]model.Release, error) {
	return ListAll[model.Release](ctx, c, subjects.VerbReleases, listQuery)
}

// Rollouts lists every rollout summary, oldest first.
func (c *Client) Rollouts(ctx context.Context) ([]model.Rollout, error) {
	return ListAll[model.Rollout](ctx, c, subjects.VerbRollouts, listQuery)
}

// Audit lists the audit entries of the last since (0: all), oldest first.
func (c *Client) Audit(ctx context.Context, since time.Duration) ([]model.AuditRecord, error) {
	return ListAll[model.AuditRecord](ctx, c, subjects.VerbAudit, func(p model.Page) any {
		return model.AuditQuery{Since: since, Page: p}
	})
}

// Facts lists the fact reports of the device ref names of the last since,
// oldest first.
func (c *Client) Facts(ctx context.Context, ref string, since time.Duration) ([]model.Facts, error) {
	return ListAll[model.Facts](ctx, c, subjects.VerbFacts, func(p model.Page) any {
		return model.FactsQuery{Ref: ref, Since: since, Page: p}
	})
}

// Status reads the fleet's status: every device row of group ("" = all),
// with the summary and time of the first page.
func (c *Client) Status(ctx context.Context, group string) (*model.StatusReport, error) {
	var rep *model.StatusReport
	err := c.EachPage(ctx, subjects.VerbStatus, func(ctx context.Context, p model.Page) (string, error) {
		var page model.StatusReport
		if err := c.Call(ctx, subjects.VerbStatus, false, model.StatusQuery{Group: group, Page: p}, &page); err != nil {
			return "", err
		}
		if rep == nil {
			rep = &page
		} else {
			rep.Devices = append(rep.Devices, page.Devices...)
		}
		return page.Next, nil
	})
	if err != nil {
		return nil, err
	}
	if rep.Devices == nil {
		rep.Devices = []model.DeviceStatusRow{}
	}
	rep.Next = ""
	return rep, nil
}

// Rollout reads a rollout with every device's progress; the summary is the
// last page's, read after all the rows.
func (c *Client) Rollout(ctx context.Context, id string) (*model.RolloutView, error) {
	var rows []model.RolloutProgress
	var v model.RolloutView
	err := c.EachPage(ctx, subjects.VerbRollout, func(ctx context.Context, p model.Page) (string, error) {
		v = model.RolloutView{}
		if err := c.Call(ctx, subjects.VerbRollout, false, model.RolloutRef{ID: id, Page: p}, &v); err != nil {
			return "", err
		}
		rows = append(rows, v.Progress...)
		return v.Next, nil
	})
	if err != nil {
		return nil, err
	}
	if rows == nil {
		rows = []model.RolloutProgress{}
	}
	v.Progress, v.Next = rows, ""
	return &v, nil
}

// RolloutSummary reads a rollout without its devices' progress: a small
// reply, for polling.
func (c *Client) RolloutSummary(ctx context.Context, id string) (*model.Rollout, error) {
	var v model.RolloutView
	if err := c.Call(ctx, subjects.VerbRollout, false, model.RolloutRef{ID: id, SummaryOnly: true}, &v); err != nil {
		return nil, err
	}
	return &v.Rollout, nil
}
