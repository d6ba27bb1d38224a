package admin

import (
	"bufio"
	"errors"
	"fmt"
	"strings"
)

// confirm asks "question [y/N]" on a terminal before a destructive verb.
// --yes (FLEET_YES) answers yes; without a terminal on stdin, and without
// --yes, the verb is refused: a script must say it means it.
func (g *Globals) confirm(question string) error {
	if g.Yes {
		return nil
	}
	if !g.stdinTTY || g.stdin == nil {
		return usageError(fmt.Errorf("%s: refused without confirmation, and stdin is not a terminal to ask on: pass --yes (or set FLEET_YES=1)", question))
	}
	fmt.Fprintf(g.stderr, "%s [y/N] ", question)
	line, err := bufio.NewReader(g.stdin).ReadString('\n')
	if err != nil && line == "" {
		fmt.Fprintln(g.stderr)
		return withCode(ExitError, errors.New("not confirmed: nothing was changed"))
	}
	switch strings.ToLower(strings.TrimSpace(line)) {
	case "y", "yes":
		return nil
	}
	return withCode(ExitError, errors.New("not confirmed: nothing was changed"))
}
