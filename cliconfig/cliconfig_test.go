package cliconfig

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alecthomas/kong"
)

type testCLI struct {
	Config kong.ConfigFlag `help:"config"`
	Run    struct {
		StateDir string        `default:"/var/lib/x" env:"CLICONFIG_TEST_STATE_DIR"`
		Server   []string      `sep:","`
		Interval time.Duration `default:"60s"`
		Count    int
	} `cmd:""`
}

func parse(t *testing.T, body string, args ...string) (*testCLI, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "c.json")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	var cli testCLI
	p, err := kong.New(&cli, kong.Configuration(Loader("health-checks"), path), kong.Exit(func(int) { t.Fatal("exit") }))
	if err != nil {
		return nil, err
	}
	_, err = p.Parse(append([]string{"run"}, args...))
	return &cli, err
}

func TestHyphenatedKeys(t *testing.T) {
	cli, err := parse(t, `{"state-dir": "/srv/a", "server": ["nats://a:4222", "nats://b:4222"], "interval": "5s", "count": 3, "health-checks": []}`)
	if err != nil {
		t.Fatal(err)
	}
	if cli.Run.StateDir != "/srv/a" || len(cli.Run.Server) != 2 || cli.Run.Interval != 5*time.Second || cli.Run.Count != 3 {
		t.Fatalf("parsed %+v", cli.Run)
	}
	// A flag on the command line wins over the file.
	cli, err = parse(t, `{"state-dir": "/srv/a"}`, "--state-dir", "/srv/b")
	if err != nil || cli.Run.StateDir != "/srv/b" {
		t.Fatalf("flag over file: %v %+v", err, cli.Run)
	}
}

func TestUnknownKeysRefused(t *testing.T) {
	for _, body := range []string{`{"state_dir": "/srv/a"}`, `{"stateDir": "/srv/a"}`, `{"typo": 1}`} {
		_, err := parse(t, body)
		if err == nil || !strings.Contains(err.Error(), "unknown key") {
			t.Errorf("%s: error %v", body, err)
		}
	}
	for _, body := range []string{`[1,2]`, `{`, `"x"`} {
		if _, err := parse(t, body); err == nil {
			t.Errorf("%s accepted", body)
		}
	}
}

// A flag beats the environment, which beats the file, which beats the
// default.
func TestPrecedence(t *testing.T) {
	t.Setenv("CLICONFIG_TEST_STATE_DIR", "/from/env")
	cli, err := parse(t, `{"state-dir": "/from/file"}`)
	if err != nil || cli.Run.StateDir != "/from/env" {
		t.Fatalf("env over file: %v %+v", err, cli.Run)
	}
	cli, err = parse(t, `{"state-dir": "/from/file"}`, "--state-dir", "/from/flag")
	if err != nil || cli.Run.StateDir != "/from/flag" {
		t.Fatalf("flag over env and file: %v %+v", err, cli.Run)
	}
	os.Unsetenv("CLICONFIG_TEST_STATE_DIR")
	cli, err = parse(t, `{"state-dir": "/from/file"}`)
	if err != nil || cli.Run.StateDir != "/from/file" {
		t.Fatalf("file over default: %v %+v", err, cli.Run)
	}
}
