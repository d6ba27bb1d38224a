package admin

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nkeys"

	"fleet/accounts"
	"fleet/model"
	"fleet/subjects"
)

// AdminCmd is `fleet-admin admin`.
type AdminCmd struct {
	Add    AdminAddCmd    `cmd:"" help:"Add an admin and write its credentials."`
	Ls     AdminLsCmd     `cmd:"" help:"List admins."`
	Remove AdminRemoveCmd `cmd:"" help:"Remove an admin; its credentials stop working at once."`
}

// AdminAddCmd is `fleet-admin admin add`.
type AdminAddCmd struct {
	Name  string   `arg:"" help:"Admin name (a person or a CI job)."`
	Role  string   `help:"observer (devices, status, facts: for dashboards), viewer (read), operator (releases, deploys, devices) or owner (everything)." required:"" enum:"observer,viewer,operator,owner"`
	Group []string `help:"Limit an operator to devices of these groups (repeatable)."`
	Out   string   `help:"Where to write the new admin's creds (mode 0600)." required:"" type:"path"`
}

// Run creates a key here, has the coordinator issue its JWT and writes the
// creds: the seed never leaves this machine.
func (cmd *AdminAddCmd) Run(g *Globals) error {
	if _, err := os.Stat(cmd.Out); err == nil {
		return fmt.Errorf("--out %s exists already; choose another path (nothing was changed)", cmd.Out)
	}
	kp, err := nkeys.CreateUser()
	if err != nil {
		return err
	}
	pub, _ := kp.PublicKey()
	var out model.AdminAdded
	if err := g.call(subjects.VerbAdminAdd, true, model.AdminAdd{Name: cmd.Name, Role: cmd.Role, Groups: cmd.Group, Key: pub}, &out); err != nil {
		return err
	}
	if err := accounts.WriteCreds(cmd.Out, &accounts.Creds{JWT: out.JWT, Key: kp}); err != nil {
		return fmt.Errorf("admin %s was added but its creds could not be written (remove it with `fleet-admin admin remove %s` and retry): %w", cmd.Name, cmd.Name, err)
	}
	if g.JSON {
		return g.printJSON(out.Admin)
	}
	_, err = fmt.Fprintf(g.stdout, "added %s %s (%s); creds in %s\n", out.Admin.Role, out.Admin.Name, out.Admin.Key, cmd.Out)
	return err
}

// AdminLsCmd is `fleet-admin admin ls`.
type AdminLsCmd struct{}

// Run lists admins.
func (AdminLsCmd) Run(g *Globals) error {
	return printList(g, func(c *Client) ([]model.Admin, error) {
		as, err := c.Admins(g.ctx)
		slices.SortStableFunc(as, func(a, b model.Admin) int { return strings.Compare(a.Name, b.Name) })
		return as, err
	}, "NAME\tROLE\tGROUPS\tKEY\tCREATED", func(a model.Admin) string {
		return fmt.Sprintf("%s\t%s\t%s\t%s\t%s", a.Name, a.Role, orDash(strings.Join(a.Groups, ",")), a.Key, localTime(a.CreatedAt))
	})
}

// AdminRemoveCmd is `fleet-admin admin remove`.
type AdminRemoveCmd struct {
	Ref string `arg:"" help:"Admin name or key."`
}

// Run removes an admin, once confirmed.
func (cmd *AdminRemoveCmd) Run(g *Globals) error {
	if err := g.confirm(fmt.Sprintf("remove admin %s? Its credentials stop working at once", cmd.Ref)); err != nil {
		return err
	}
	var out model.Admin
	if err := g.call(subjects.VerbAdminRemove, true, model.AdminRef{Ref: cmd.Ref}, &out); err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(out)
	}
	_, err := fmt.Fprintf(g.stdout, "removed %s %s; its key is revoked\n", out.Role, out.Name)
	return err
}

// AuditCmd is `fleet-admin audit`.
type AuditCmd struct {
	Ls     AuditLsCmd     `cmd:"" help:"List audit entries."`
	Verify AuditVerifyCmd `cmd:"" help:"Check the signature of every audit entry."`
}

// AuditLsCmd is `fleet-admin audit ls`.
type AuditLsCmd struct {
	Since Since `help:"Only entries this recent: 90m, 24h, 1d, 2w; 0 for all." default:"24h"`
}

// Run lists audit entries.
func (cmd *AuditLsCmd) Run(g *Globals) error {
	recs, err := auditRecords(g, cmd.Since.D())
	if err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(recs)
	}
	tw := newTable(g.stdout)
	fmt.Fprintln(tw, "TIME\tADMIN\tROLE\tVERB\tRESULT\tARGUMENTS\tERROR")
	for _, r := range recs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", localTime(r.Time), orDash(r.Admin), orDash(r.Role),
			r.Verb, r.Result, auditArgs(r), r.Error)
	}
	return tw.Flush()
}

func auditRecords(g *Globals, since time.Duration) ([]model.AuditRecord, error) {
	if since < 0 {
		return nil, usageError(errors.New("--since must not be negative"))
	}
	var recs []model.AuditRecord
	err := g.withClient(func(c *Client) (err error) {
		recs, err = c.Audit(g.ctx, since)
		return err
	})
	return recs, err
}

// auditArgs is the request's arguments, shortened for a table; durations
// (sent as nanoseconds) read as 24h.
func auditArgs(r model.AuditRecord) string {
	_, req, err := model.ParseEnvelope(r.Request)
	if err != nil || req == nil {
		return "-"
	}
	s := string(req.Args)
	var args map[string]any
	dec := json.NewDecoder(strings.NewReader(s))
	dec.UseNumber()
	if dec.Decode(&args) == nil {
		for k, v := range args {
			if n, ok := v.(json.Number); ok && durationArgs[k] {
				if ns, err := n.Int64(); err == nil {
					args[k] = durationText(time.Duration(ns))
				}
			}
		}
		if b, err := json.Marshal(args); err == nil {
			s = string(b)
		}
	}
	if len(s) > 60 {
		s = s[:57] + "..."
	}
	return s
}

// durationArgs are the request arguments that are time.Durations (JSON
// nanoseconds): token create's ttl, audit's and facts' since.
var durationArgs = map[string]bool{"ttl": true, "since": true}

// AuditVerifyCmd is `fleet-admin audit verify`.
type AuditVerifyCmd struct{}

// Run verifies every entry here, trusting nothing the coordinator says: an
// entry that took effect must carry a request signed by the admin it names.
func (AuditVerifyCmd) Run(g *Globals) error {
	recs, err := auditRecords(g, 0)
	if err != nil {
		return err
	}
	var bad []string
	refusedBad := 0
	for i, r := range recs {
		env, req, perr := model.ParseEnvelope(r.Request)
		ok := perr == nil && env.Signer == r.Signer && req.Verb == r.Verb
		if perr == nil && !ok {
			perr = fmt.Errorf("signed by %s for verb %s, recorded as %s by %s", env.Signer, req.Verb, r.Verb, r.Signer)
		}
		if r.Result == model.AuditRefused {
			if !ok {
				refusedBad++ // refused because unsigned or forged: as it should be
			}
			continue
		}
		if !ok {
			bad = append(bad, fmt.Sprintf("entry %d (%s %s by %s at %s): %v", i+1, r.Verb, r.Result, orDash(r.Admin), r.Time.Format(time.RFC3339), perr))
		}
	}
	// Each entry names the hash of the one before: a lost, removed or
	// altered entry breaks the chain where it was.
	for _, i := range model.CheckAuditChain(recs) {
		r := recs[i]
		bad = append(bad, fmt.Sprintf("entry %d (%s %s at %s): the entry before it is missing or was altered", i+1, r.Verb, r.Result, r.Time.Format(time.RFC3339)))
	}
	truncated := len(recs) > 0 && recs[0].Prev != ""
	if g.JSON {
		if err := g.printJSON(map[string]any{"entries": len(recs), "invalid": bad, "refused_unsigned": refusedBad, "oldest_dropped": truncated}); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(g.stdout, "%s; %s with a bad signature or a broken chain; %s unsigned or forged\n", plural(len(recs), "entry", "entries"),
			plural(len(bad), "accepted entry", "accepted entries"), plural(refusedBad, "refused request was", "refused requests were"))
		if truncated {
			fmt.Fprintln(g.stdout, "the oldest entries were dropped by the audit's size limit (--storage-gib); the chain holds from the first one kept")
		}
		for _, b := range bad {
			fmt.Fprintln(g.stdout, "  "+b)
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("audit verification failed: %s (signature or chain)", plural(len(bad), "entry does not verify", "entries do not verify"))
	}
	return nil
}
