package admin

import (
	"fmt"
	"strings"
	"time"

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
}

// Run creates the token.
func (cmd *TokenCreateCmd) Run(g *Globals) error {
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	t, err := c.CreateToken(g.ctx, model.TokenCreate{Groups: cmd.Group, Uses: cmd.Uses, TTL: cmd.TTL, Approval: cmd.Approval, Site: cmd.Site})
	if err != nil {
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

// Run lists tokens.
func (cmd *TokenLsCmd) Run(g *Globals) error {
	now := time.Now()
	return printList(g, func(c *Client) ([]model.TokenInfo, error) { return c.Tokens(g.ctx) },
		"ID\tGROUPS\tUSES LEFT\tUSED\tEXPIRES\tAPPROVAL\tSTATE", func(t model.TokenInfo) string {
			state := "valid"
			switch {
			case t.Revoked:
				state = "revoked"
			case !now.Before(t.ExpiresAt):
				state = "expired"
			case t.Uses <= 0:
				state = "used up"
			}
			return fmt.Sprintf("%s\t%s\t%d\t%d\t%s\t%v\t%s", t.ID, strings.Join(t.Groups, ","), t.Uses, t.Used,
				t.ExpiresAt.Local().Format(time.DateTime), t.Approval, state)
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
