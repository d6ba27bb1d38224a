package admin

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/google/renameio/v2"

	"fleet/model"
)

// TokenCmd is `fleet-admin token`.
type TokenCmd struct {
	Create TokenCreateCmd `cmd:"" help:"Create an enrollment token; prints it alone on stdout."`
	Ls     TokenLsCmd     `cmd:"" help:"List tokens (never their secrets)."`
	Revoke TokenRevokeCmd `cmd:"" help:"Revoke a token: no more enrollments with it."`
}

// TokenCreateCmd is `fleet-admin token create`.
type TokenCreateCmd struct {
	Group    []string      `help:"Group the enrolled devices join (repeatable, or comma-separated)." required:"" sep:","`
	Uses     int           `help:"How many devices may enrol with it." default:"1"`
	TTL      time.Duration `name:"ttl" help:"How long it is valid." default:"24h"`
	Approval bool          `help:"Enrolled devices stay pending until fleet-admin devices approve."`
	Site     string        `help:"Site whose leaf node the devices connect through (as in leaf config --site); empty: the hub."`
	Out      string        `help:"Write the token to this file (mode 0600, replaced atomically; nothing is written if creating it fails) instead of stdout." type:"path" placeholder:"FILE"`
}

// Run creates the token.
func (cmd *TokenCreateCmd) Run(g *Globals) error {
	// With --out, the file is prepared before the token exists: a path
	// that cannot be written fails before anything is created.
	var pf *renameio.PendingFile
	if cmd.Out != "" {
		var err error
		// Mode 0600 whatever the umask, and whatever a replaced file had.
		if pf, err = renameio.NewPendingFile(cmd.Out, renameio.WithStaticPermissions(0o600)); err != nil {
			return fmt.Errorf("--out %s: %w (no token was created)", cmd.Out, err)
		}
		defer pf.Cleanup()
	}
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	t, err := c.CreateToken(g.ctx, model.TokenCreate{Groups: cmd.Group, Uses: cmd.Uses, TTL: cmd.TTL, Approval: cmd.Approval, Site: cmd.Site})
	if err != nil {
		return err
	}
	if pf != nil {
		if _, err := pf.WriteString(t.Token + "\n"); err == nil {
			err = pf.CloseAtomicallyReplace()
		}
		if err != nil {
			// The token is useless to anyone without the file: revoke it.
			if _, rerr := c.RevokeToken(g.ctx, t.ID); rerr != nil {
				return fmt.Errorf("--out %s: %w; token %s was created but could not be revoked (%v): revoke it with `fleet-admin token revoke %s`", cmd.Out, err, t.ID, rerr, t.ID)
			}
			return fmt.Errorf("--out %s: %w (token %s was revoked again)", cmd.Out, err, t.ID)
		}
		if g.JSON {
			return g.printJSON(map[string]any{"out": cmd.Out, "id": t.ID, "groups": t.Groups, "uses": t.Uses, "expires_at": t.ExpiresAt, "approval": t.Approval, "site": t.Site})
		}
		_, err := fmt.Fprintf(g.stdout, "token %s (%s, %s, expires %s) written to %s\n", t.ID, noun(len(t.Groups), "group", "groups")+" "+strings.Join(t.Groups, ", "),
			plural(t.Uses, "use", "uses"), localTime(t.ExpiresAt), cmd.Out)
		return err
	}
	if g.JSON {
		return g.printJSON(struct {
			Token     string    `json:"token"`
			ID        string    `json:"id"`
			Groups    []string  `json:"groups"`
			Uses      int       `json:"uses"`
			ExpiresAt time.Time `json:"expires_at"`
			Approval  bool      `json:"approval"`
			Site      string    `json:"site,omitempty"`
		}{t.Token, t.ID, t.Groups, t.Uses, t.ExpiresAt, t.Approval, t.Site})
	}
	// The token alone, so `$(fleet-admin token create ...)` captures it.
	_, err = fmt.Fprintln(g.stdout, t.Token)
	return err
}

// TokenLsCmd is `fleet-admin token ls`.
type TokenLsCmd struct{}

// tokenRow is a token as token ls shows it: the state is the same word in
// the table and in --json.
type tokenRow struct {
	model.TokenInfo
	State string `json:"state"`
}

// tokenState is valid, revoked, expired or used_up.
func tokenState(t model.TokenInfo, now time.Time) string {
	switch {
	case t.Revoked:
		return "revoked"
	case !now.Before(t.ExpiresAt):
		return "expired"
	case t.Uses <= 0:
		return "used_up"
	}
	return "valid"
}

// Run lists tokens, the soonest to expire first.
func (cmd *TokenLsCmd) Run(g *Globals) error {
	now := time.Now()
	return printList(g, func(c *Client) ([]tokenRow, error) {
		ts, err := c.Tokens(g.ctx)
		rows := make([]tokenRow, len(ts))
		for i, t := range ts {
			rows[i] = tokenRow{t, tokenState(t, now)}
		}
		slices.SortStableFunc(rows, func(a, b tokenRow) int { return cmp.Or(a.ExpiresAt.Compare(b.ExpiresAt), strings.Compare(a.ID, b.ID)) })
		return rows, err
	}, "ID\tGROUPS\tUSES LEFT\tUSED\tEXPIRES\tAPPROVAL\tSTATE", func(t tokenRow) string {
		return fmt.Sprintf("%s\t%s\t%d\t%d\t%s\t%s\t%s", t.ID, strings.Join(t.Groups, ","), t.Uses, t.Used,
			localTime(t.ExpiresAt), yesNo(t.Approval), t.State)
	})
}

// TokenRevokeCmd is `fleet-admin token revoke`.
type TokenRevokeCmd struct {
	ID string `arg:"" help:"Token id (see token ls)."`
}

// Run revokes the token.
func (cmd *TokenRevokeCmd) Run(g *Globals) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	t, err := c.RevokeToken(g.ctx, cmd.ID)
	if err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(t)
	}
	_, err = fmt.Fprintf(g.stdout, "token %s revoked\n", t.ID)
	return err
}
