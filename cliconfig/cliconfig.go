// Package cliconfig reads fleet's JSON config files for kong. Keys are the
// flag names exactly as typed on the command line ("state-dir"), and a key
// that names no flag is an error, so a typo in a config file never passes
// silently. A value comes from the command line, else the flag's FLEET_*
// environment variable, else the file, else the flag's default.
package cliconfig

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strings"

	"github.com/alecthomas/kong"
)

// Loader returns a kong.ConfigurationLoader for JSON files. extra names keys
// that the program reads itself (not flags), which are allowed too.
func Loader(extra ...string) kong.ConfigurationLoader {
	return func(r io.Reader) (kong.Resolver, error) {
		name := "config file"
		if f, ok := r.(*os.File); ok {
			name += " " + f.Name()
		}
		values := map[string]any{}
		dec := json.NewDecoder(r)
		dec.UseNumber()
		if err := dec.Decode(&values); err != nil {
			return nil, fmt.Errorf("%s is not a JSON object: %w", name, err)
		}
		return &resolver{name: name, values: values, extra: extra}, nil
	}
}

type resolver struct {
	name   string
	values map[string]any
	extra  []string
}

// Validate refuses keys that are neither a flag nor an extra key.
func (r *resolver) Validate(app *kong.Application) error {
	flags := map[string]bool{}
	var walk func(n *kong.Node)
	walk = func(n *kong.Node) {
		for _, f := range n.Flags {
			flags[f.Name] = true
		}
		for _, c := range n.Children {
			walk(c)
		}
	}
	walk(app.Node)
	var unknown []string
	for k := range r.values {
		if !flags[k] && !slices.Contains(r.extra, k) {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return fmt.Errorf("%s: unknown key(s) %s (keys are flag names as on the command line, e.g. %q; see --help)",
			r.name, strings.Join(unknown, ", "), "log-level")
	}
	return nil
}

// Resolve returns the value of flag's key, if the file sets it and the
// flag's environment variable is not set: a flag on the command line wins
// over the environment, which wins over the file.
func (r *resolver) Resolve(_ *kong.Context, _ *kong.Path, flag *kong.Flag) (any, error) {
	v, ok := r.values[flag.Name]
	if !ok {
		return nil, nil
	}
	for _, env := range flag.Envs {
		if _, set := os.LookupEnv(env); set {
			return nil, nil
		}
	}
	// kong maps JSON numbers given as json.Number through their text.
	if n, ok := v.(json.Number); ok {
		return n.String(), nil
	}
	return v, nil
}
