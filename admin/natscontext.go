package admin

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strings"

	"github.com/google/renameio/v2"

	"fleet/accounts"
)

// natscli keeps its contexts as JSON files: $XDG_CONFIG_HOME/nats/context/
// NAME.json (~/.config/nats/context without XDG_CONFIG_HOME), and the name
// of the selected one (`nats context select`) in .../nats/context.txt.
// fleet-admin reads the fields it can use and writes contexts that the
// `nats` command uses as they are.

// natsContext is the part of a natscli context fleet-admin knows.
type natsContext struct {
	Description string `json:"description"`
	URL         string `json:"url"`
	Creds       string `json:"creds"`
	InboxPrefix string `json:"inbox_prefix"`
	// Ways to authenticate fleet-admin cannot use (it needs an admin's
	// creds file): named in the error when they are all a context has.
	NKey     string `json:"nkey,omitempty"`
	User     string `json:"user,omitempty"`
	Token    string `json:"token,omitempty"`
	UserJWT  string `json:"user_jwt,omitempty"`
	Name     string `json:"-"`
	Path     string `json:"-"`
	selected bool
}

// natsConfigDir is natscli's directory, ~/.config/nats or
// $XDG_CONFIG_HOME/nats.
func natsConfigDir() (string, error) {
	if x := os.Getenv("XDG_CONFIG_HOME"); x != "" {
		return filepath.Join(x, "nats"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil || home == "" {
		u, uerr := user.Current()
		if uerr != nil || u.HomeDir == "" {
			return "", fmt.Errorf("cannot find the home directory for NATS contexts: %v", err)
		}
		home = u.HomeDir
	}
	return filepath.Join(home, ".config", "nats"), nil
}

// checkContextName refuses names natscli refuses (and paths).
func checkContextName(name string) error {
	if name == "" || strings.Contains(name, "..") || strings.ContainsAny(name, `/\`) {
		return usageError(fmt.Errorf("%q is not a NATS context name (no /, \\ or ..)", name))
	}
	return nil
}

func contextPath(name string) (string, error) {
	if err := checkContextName(name); err != nil {
		return "", err
	}
	dir, err := natsConfigDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, "context", name+".json"), nil
}

// selectedContext is the context `nats context select` chose, or "".
func selectedContext() string {
	dir, err := natsConfigDir()
	if err != nil {
		return ""
	}
	b, err := os.ReadFile(filepath.Join(dir, "context.txt"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// loadContext reads the context name.
func loadContext(name string) (*natsContext, error) {
	path, err := contextPath(name)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("NATS context %q does not exist (no %s); write one with `fleet-admin context save %s`", name, path, name)
	}
	if err != nil {
		return nil, fmt.Errorf("NATS context %q: %w", name, err)
	}
	var c natsContext
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("NATS context %q (%s) is not JSON: %w", name, path, err)
	}
	c.Name, c.Path = name, path
	c.Creds = expandHome(c.Creds)
	return &c, nil
}

// expandHome expands environment variables and a leading ~, as natscli
// does for the paths in a context.
func expandHome(p string) string {
	p = os.ExpandEnv(p)
	if p == "~" || strings.HasPrefix(p, "~/") {
		if home, err := os.UserHomeDir(); err == nil {
			return home + p[1:]
		}
	}
	return p
}

// DefaultServer is the coordinator fleet-admin talks to when neither a
// flag, the environment, a config file nor a NATS context names one.
const DefaultServer = "nats://127.0.0.1:4222"

// settle fills --server and --creds from a NATS context where neither the
// command line, the environment nor --config set them: the one --context
// or $NATS_CONTEXT names, else the one `nats context select` chose. A named
// context must exist; the selected one is read only when it is needed.
func (g *Globals) settle() error {
	name, explicit := g.Context, g.Context != ""
	if !explicit && g.Server != "" && g.Creds != "" {
		return nil
	}
	if !explicit {
		name = selectedContext()
	}
	if name != "" {
		c, err := loadContext(name)
		if err != nil {
			if explicit {
				return usageError(err)
			}
			return fmt.Errorf("the selected NATS context (nats context select): %w", err)
		}
		c.selected = !explicit
		g.natsCtx = c
		if g.Server == "" {
			g.Server = c.URL
		}
		if g.Creds == "" {
			g.Creds = c.Creds
			if c.Creds == "" && (c.NKey != "" || c.User != "" || c.Token != "" || c.UserJWT != "") {
				return usageError(fmt.Errorf("NATS context %q (%s) has no creds file: fleet-admin signs with an admin's creds (fleet-admin admin add --out FILE), not an nkey, user, token or JWT alone; pass --creds", name, c.Path))
			}
		}
	}
	if g.Server == "" {
		g.Server = DefaultServer
	}
	return nil
}

// ContextCmd is `fleet-admin context`.
type ContextCmd struct {
	Save ContextSaveCmd `cmd:"" help:"Write a NATS context (as natscli's nats context save) with this coordinator, these creds and the admin's inbox prefix."`
	Show ContextShowCmd `cmd:"" help:"Show the NATS context fleet-admin would use, and where --server and --creds come from."`
}

// ContextSaveCmd is `fleet-admin context save`.
type ContextSaveCmd struct {
	Name        string `arg:"" help:"Context name (the file is ~/.config/nats/context/NAME.json)."`
	Description string `help:"Description shown by nats context ls." default:"fleet admin"`
	Select      bool   `help:"Also select it (as nats context select), so fleet-admin and nats use it without --context."`
	Force       bool   `help:"Overwrite a context of that name."`
}

// Run writes the context: server, the creds' absolute path and the inbox
// prefix the admin's permissions allow, so `nats --context NAME` works.
func (cmd *ContextSaveCmd) Run(g *Globals) error {
	path, err := contextPath(cmd.Name)
	if err != nil {
		return err
	}
	if g.Creds == "" {
		return usageError(errors.New("no creds to save: pass --creds (an admin's creds file) or set FLEET_CREDS"))
	}
	creds, err := filepath.Abs(g.Creds)
	if err != nil {
		return err
	}
	cr, err := accounts.ReadCreds(creds)
	if err != nil {
		return fmt.Errorf("--creds: %w", err)
	}
	if _, err := os.Stat(path); err == nil && !cmd.Force {
		return usageError(fmt.Errorf("NATS context %q exists (%s); pass --force to overwrite it", cmd.Name, path))
	}
	c := natsContext{Description: cmd.Description, URL: g.Server, Creds: creds, InboxPrefix: cr.InboxPrefix()}
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	if err := renameio.WriteFile(path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("write NATS context: %w", err)
	}
	if cmd.Select {
		if err := renameio.WriteFile(filepath.Join(filepath.Dir(filepath.Dir(path)), "context.txt"), []byte(cmd.Name), 0o600); err != nil {
			return fmt.Errorf("select NATS context: %w", err)
		}
	}
	if g.JSON {
		return g.printJSON(map[string]any{"name": cmd.Name, "path": path, "url": c.URL, "creds": c.Creds, "inbox_prefix": c.InboxPrefix, "selected": cmd.Select})
	}
	_, err = fmt.Fprintf(g.stdout, "saved NATS context %s in %s\nuse it with: fleet-admin --context %s ...  or  nats --context %s ...\n", cmd.Name, path, cmd.Name, cmd.Name)
	return err
}

// ContextShowCmd is `fleet-admin context show`.
type ContextShowCmd struct{}

// Run prints the settings fleet-admin would connect with.
func (ContextShowCmd) Run(g *Globals) error {
	out := map[string]any{"server": g.Server, "creds": g.Creds}
	if c := g.natsCtx; c != nil {
		out["context"], out["context_path"], out["context_selected"] = c.Name, c.Path, c.selected
	}
	if g.JSON {
		return g.printJSON(out)
	}
	tw := newTable(g.stdout)
	if c := g.natsCtx; c != nil {
		how := "--context / NATS_CONTEXT"
		if c.selected {
			how = "selected with nats context select"
		}
		fmt.Fprintf(tw, "context:\t%s (%s; %s)\n", c.Name, c.Path, how)
	} else {
		fmt.Fprintf(tw, "context:\tnone\n")
	}
	fmt.Fprintf(tw, "server:\t%s\n", g.Server)
	fmt.Fprintf(tw, "creds:\t%s\n", orDash(g.Creds))
	return tw.Flush()
}
