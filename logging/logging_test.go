package logging

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/rs/zerolog"
)

// The adapter must satisfy the server's logger interface.
var _ server.Logger = NATS{}

func TestNewJSON(t *testing.T) {
	var buf bytes.Buffer
	log, err := New(&buf, "warn", "json")
	if err != nil {
		t.Fatal(err)
	}
	log.Info().Msg("hidden")
	log.Warn().Str("k", "v").Msg("shown")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 1 {
		t.Fatalf("got %d lines, want 1: %q", len(lines), buf.String())
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &m); err != nil {
		t.Fatalf("not JSON: %q: %v", lines[0], err)
	}
	if m["message"] != "shown" || m["level"] != "warn" || m["k"] != "v" || m["time"] == nil {
		t.Errorf("log line %v", m)
	}
}

func TestNewFormats(t *testing.T) {
	for _, f := range []string{"console", "auto", ""} {
		var buf bytes.Buffer
		log, err := New(&buf, "INFO", f)
		if err != nil {
			t.Fatalf("format %q: %v", f, err)
		}
		log.Info().Msg("hello")
		out := buf.String()
		if !strings.Contains(out, "hello") {
			t.Errorf("format %q wrote %q", f, out)
		}
		// A buffer is not a terminal: auto means JSON.
		if isJSON := strings.HasPrefix(out, "{"); isJSON != (f != "console") {
			t.Errorf("format %q: JSON=%v, output %q", f, isJSON, out)
		}
	}
}

func TestNewInvalid(t *testing.T) {
	for _, c := range []struct{ level, format, want string }{
		{"", "json", "log level"},
		{"loud", "json", `"loud"`},
		{"info", "xml", `"xml"`},
	} {
		_, err := New(&bytes.Buffer{}, c.level, c.format)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("New(%q, %q) = %v, want an error naming %s", c.level, c.format, err, c.want)
		}
	}
}

func TestNATSAdapter(t *testing.T) {
	var buf bytes.Buffer
	var fatal []string
	n := NATS{L: zerolog.New(&buf).Level(zerolog.TraceLevel), OnFatal: func(m string) { fatal = append(fatal, m) }}
	n.Noticef("notice %d", 1)
	n.Warnf("warn %d", 2)
	n.Errorf("error %d", 3)
	n.Debugf("debug %d", 4)
	n.Tracef("trace %d", 5)
	n.Fatalf("fatal %d", 6) // must not exit the process
	want := []struct{ level, msg string }{
		{"info", "notice 1"}, {"warn", "warn 2"}, {"error", "error 3"},
		{"debug", "debug 4"}, {"trace", "trace 5"}, {"error", "fatal 6"},
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != len(want) {
		t.Fatalf("got %d lines: %q", len(lines), buf.String())
	}
	for i, w := range want {
		var m map[string]any
		if err := json.Unmarshal([]byte(lines[i]), &m); err != nil {
			t.Fatal(err)
		}
		if m["level"] != w.level || m["message"] != w.msg {
			t.Errorf("line %d = %v, want %s %q", i, m, w.level, w.msg)
		}
	}
	if len(fatal) != 1 || fatal[0] != "fatal 6" {
		t.Errorf("OnFatal got %q", fatal)
	}
	// Without OnFatal, Fatalf still only logs.
	NATS{L: zerolog.Nop()}.Fatalf("x")
}
