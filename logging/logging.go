// Package logging sets up fleet's zerolog loggers: JSON lines by default,
// human-readable console output when writing to a terminal, and an adapter
// that routes the embedded nats-server's log through the same logger.
package logging

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/rs/zerolog"
)

// New returns a logger writing to w at level (debug, info, warn, error).
// format is "json", "console" or "auto" (console when w is a terminal).
func New(w io.Writer, level, format string) (zerolog.Logger, error) {
	lvl, err := zerolog.ParseLevel(strings.ToLower(level))
	if err != nil || level == "" {
		return zerolog.Nop(), fmt.Errorf("invalid log level %q (use debug, info, warn or error)", level)
	}
	switch format {
	case "json":
	case "console":
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: time.TimeOnly}
	case "auto", "":
		if f, ok := w.(*os.File); ok && isatty.IsTerminal(f.Fd()) {
			w = zerolog.ConsoleWriter{Out: w, TimeFormat: time.TimeOnly}
		}
	default:
		return zerolog.Nop(), fmt.Errorf("invalid log format %q (use auto, json or console)", format)
	}
	return zerolog.New(w).Level(lvl).With().Timestamp().Logger(), nil
}

// NATS adapts a zerolog.Logger to nats-server's Logger interface. The
// server's Fatalf is logged as an error: an embedded server must never end
// the process that hosts it.
type NATS struct {
	L zerolog.Logger
	// OnFatal, if set, also receives fatal messages, so the host can report
	// why the server did not start.
	OnFatal func(msg string)
}

func (n NATS) Noticef(format string, v ...any) { n.L.Info().Msgf(format, v...) }
func (n NATS) Warnf(format string, v ...any)   { n.L.Warn().Msgf(format, v...) }
func (n NATS) Fatalf(format string, v ...any) {
	msg := fmt.Sprintf(format, v...)
	n.L.Error().Msg(msg)
	if n.OnFatal != nil {
		n.OnFatal(msg)
	}
}
func (n NATS) Errorf(format string, v ...any) { n.L.Error().Msgf(format, v...) }
func (n NATS) Debugf(format string, v ...any) { n.L.Debug().Msgf(format, v...) }
func (n NATS) Tracef(format string, v ...any) { n.L.Trace().Msgf(format, v...) }
