package agent

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/model"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "agent.json")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// "retries": 0 means one attempt; no retries key means 1 + 3.
func TestRetriesZeroIsOneAttempt(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		retries string
		want    int
	}{{`"retries": 0,`, 1}, {``, 1 + DefaultRetries}, {`"retries": 2,`, 3}} {
		count := filepath.Join(dir, "count")
		_ = os.Remove(count)
		p := writeConfig(t, `{"server": ["nats://x:4222"], "health-checks": [{"name": "c", "type": "command", `+tc.retries+
			` "interval": "10ms", "command": ["/bin/sh", "-c", "echo x >> `+count+`; exit 1"]}]}`)
		fc, err := LoadFileConfig(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := RunHealthChecks(context.Background(), NewHealthChecks(fc, zerolog.Nop()), 10*time.Second); err == nil {
			t.Fatal("a failing check passed")
		}
		b, _ := os.ReadFile(count)
		if n := strings.Count(string(b), "x"); n != tc.want {
			t.Fatalf("%q: %d attempts, want %d", tc.retries, n, tc.want)
		}
		// Written back, retries 0 stays.
		out, _ := json.Marshal(fc.HealthChecks[0])
		if tc.retries != "" && !strings.Contains(string(out), strings.ReplaceAll(strings.TrimSuffix(tc.retries, ","), " ", "")) {
			t.Fatalf("marshalled %s lacks %s", out, tc.retries)
		}
	}
}

// Unknown keys inside a health check are errors naming the file and the
// check; the top level still holds flag keys.
func TestHealthCheckUnknownKey(t *testing.T) {
	p := writeConfig(t, `{"server": ["nats://x:4222"], "state-dir": "/tmp/x", "health-checks": [
		{"name": "ok", "type": "command", "command": ["/bin/true"]},
		{"name": "web", "type": "http", "url": "http://127.0.0.1/", "expect_status": 204}]}`)
	_, err := LoadFileConfig(p)
	if err == nil {
		t.Fatal("expect_status accepted")
	}
	for _, want := range []string{p, `"web"`, "health-checks[1]", "expect_status"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("error %q does not name %s", err, want)
		}
	}
	p = writeConfig(t, `{"health-deadline": 30}`)
	if _, err := LoadFileConfig(p); err == nil || !strings.Contains(err.Error(), "health-deadline") {
		t.Fatalf("bad health-deadline: %v", err)
	}
	p = writeConfig(t, `{"server": ["nats://x:4222"], "health-deadline": "30s", "health-checks": [{"name": "web", "type": "http", "url": "http://127.0.0.1/", "expect-status": 204}]}`)
	fc, err := LoadFileConfig(p)
	if err != nil || fc.HealthChecks[0].ExpectStatus != 204 || fc.HealthDeadline.Std(0) != 30*time.Second {
		t.Fatalf("valid config: %+v, %v", fc, err)
	}
}

// --release-signer values must be admin (user) public keys.
func TestReleaseSignerValidated(t *testing.T) {
	kp, _ := nkeys.CreateUser()
	good, _ := kp.PublicKey()
	acct, _ := nkeys.CreateAccount()
	acctPub, _ := acct.PublicKey()
	seed, _ := kp.Seed()
	base := RunCmd{Recheck: time.Minute, ApprovalPoll: time.Minute, FactsInterval: time.Minute, ReconnectWithin: time.Minute, ApplyTimeout: time.Minute}
	ok := base
	ok.ReleaseSigner = []string{good}
	if err := ok.validate(); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"admin", acctPub, good + "x"} {
		c := base
		c.ReleaseSigner = []string{good, bad}
		err := c.validate()
		if err == nil || !strings.Contains(err.Error(), "--release-signer") || !strings.Contains(err.Error(), bad) {
			t.Fatalf("%q: err %v", bad, err)
		}
	}
	// A seed is refused without being echoed.
	c := base
	c.ReleaseSigner = []string{string(seed)}
	if err := c.validate(); err == nil || strings.Contains(err.Error(), string(seed)) || !strings.Contains(err.Error(), "seed") {
		t.Fatalf("seed: err %v", err)
	}
}

// Userinfo of URLs stays out of logs, events and errors.
func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"http://user:secret@cache.example/x": "http://user:xxxxx@cache.example/x",
		"nats://tok3n@127.0.0.1:4222":        "nats://xxxxx@127.0.0.1:4222",
		"http://cache.example/x":             "http://cache.example/x",
	} {
		if got := RedactURL(in); got != want {
			t.Errorf("RedactURL(%q) = %q, want %q", in, got, want)
		}
	}
	if d := cmdDesc("nix", []string{"copy", "--from", "https://u:pw@cache.example", "/nix/store/x"}); strings.Contains(d, "pw") {
		t.Errorf("command line %q shows the password", d)
	}
	err := HTTPCheck{URL: "http://u:pw@127.0.0.1:1/"}.Check(context.Background())
	if err == nil || strings.Contains(err.Error(), "pw") {
		t.Errorf("http check error %v shows the password", err)
	}
}

// fleet-agent's --facts-interval default is the fleet's (the coordinator
// counts a device behind a leaf online by it).
func TestFactsIntervalDefault(t *testing.T) {
	f, ok := reflect.TypeFor[RunCmd]().FieldByName("FactsInterval")
	if !ok {
		t.Fatal("RunCmd has no FactsInterval")
	}
	if d, err := time.ParseDuration(f.Tag.Get("default")); err != nil || d != model.FactsInterval {
		t.Fatalf("--facts-interval default %q, want %s", f.Tag.Get("default"), model.FactsInterval)
	}
}
