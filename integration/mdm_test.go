package integration

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/admin"
	"fleet/agent"
	"fleet/broker"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// mdmWorld is an in-process coordinator (so the test can read its raw
// buckets and reach a device's cmd inbox as a compromised coordinator
// would), the real fleet-admin binary, and one real `fleet-agent run`.
type mdmWorld struct {
	t       *testing.T
	ctx     context.Context
	coord   *broker.Coordinator
	creds   string
	owner   nkeys.KeyPair
	state   string
	payload string
	// rebootLog is where the stand-in reboot and systemctl on the agent's
	// PATH write; it must stay absent.
	rebootLog string
	device    string
	agentOut  procOutput
}

func newMDMWorld(t *testing.T) *mdmWorld {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	t.Cleanup(cancel)
	cfg := broker.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Listen = freeAddr(t)
	cfg.HTTP = ""
	coord, err := broker.Start(ctx, cfg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(coord.Close)
	w := &mdmWorld{t: t, ctx: ctx, coord: coord, creds: filepath.Join(cfg.DataDir, accounts.AdminCredsFile),
		state: t.TempDir(), payload: filepath.Join(t.TempDir(), "payloads")}
	cr, err := accounts.ReadCreds(w.creds)
	if err != nil {
		t.Fatal(err)
	}
	w.owner = cr.Key
	return w
}

// admin runs the fleet-admin binary as the owner.
func (w *mdmWorld) admin(args ...string) (string, string, error) {
	cmd := exec.CommandContext(w.ctx, adminBin, append([]string{"--server", w.coord.ClientURL(), "--creds", w.creds}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

func (w *mdmWorld) mustAdmin(args ...string) string {
	w.t.Helper()
	out, errs, err := w.admin(args...)
	if err != nil {
		w.t.Fatalf("fleet-admin %s: %v\n%s%s", strings.Join(args, " "), err, out, errs)
	}
	return out
}

// fakeHostTools writes a reboot and a systemctl that only note that they
// ran: the agent binary's reboot action (systemctl reboot, or reboot
// without systemd) finds them first on its PATH, so no command the test
// sends can reboot the machine it runs on.
func (w *mdmWorld) fakeHostTools() string {
	w.t.Helper()
	dir := w.t.TempDir()
	w.rebootLog = filepath.Join(w.t.TempDir(), "reboots")
	script := "#!/bin/sh\necho \"$0 $*\" >> " + w.rebootLog + "\nexit 0\n"
	for _, name := range []string{"reboot", "systemctl", "shutdown", "poweroff"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755); err != nil {
			w.t.Fatal(err)
		}
	}
	return dir
}

// startAgent enrols and runs `fleet-agent run` with --payload-dir, and
// waits until the coordinator counts it online.
func (w *mdmWorld) startAgent() {
	w.t.Helper()
	token := strings.TrimSpace(w.mustAdmin("token", "create", "--group", "wifi", "--uses", "1", "--ttl", "1h"))
	tokenFile := filepath.Join(w.t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		w.t.Fatal(err)
	}
	current := filepath.Join(w.state, "current")
	if err := os.Symlink(w.t.TempDir(), current); err != nil {
		w.t.Fatal(err)
	}
	signer, _ := w.owner.PublicKey()
	cmd := exec.Command(agentBin, "--log-format", "json", "--log-level", "debug", "run",
		"--server", w.coord.ClientURL(), "--state-dir", w.state, "--enroll-token-file", tokenFile,
		"--release-signer", signer, "--hostname", "laptop-mdm", "--payload-dir", w.payload,
		"--profile", filepath.Join(w.state, "profile"), "--current-system", current,
		"--booted-system", filepath.Join(w.state, "booted"), "--facts-interval", "1h")
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "FLEET_") && !strings.HasPrefix(kv, "PATH=") {
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, "PATH="+w.fakeHostTools()+string(os.PathListSeparator)+os.Getenv("PATH"))
	cmd.Stdout, cmd.Stderr = &w.agentOut, &w.agentOut
	if err := cmd.Start(); err != nil {
		w.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	w.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		if w.t.Failed() {
			w.t.Logf("agent output:\n%s", tail(w.agentOut.String(), 6000))
		}
	})
	credsFile := filepath.Join(w.state, agent.CredsFile)
	poll.Until(w.t, 30*time.Second, "the agent enrolled", func() bool {
		cr, err := accounts.ReadCreds(credsFile)
		if err != nil {
			return false
		}
		w.device = cr.PublicKey()
		return true
	})
	poll.Until(w.t, 30*time.Second, "the agent online", func() bool { return w.coord.Presence().Online(w.device) })
}

// deviceEvents collects the device's signed command events as the
// coordinator stored them.
type deviceEvents struct {
	mu  sync.Mutex
	evs []model.Event
}

func (w *mdmWorld) watchCommandEvents() *deviceEvents {
	w.t.Helper()
	d := &deviceEvents{}
	c, err := w.coord.JetStream().OrderedConsumer(w.ctx, subjects.StreamEvents,
		jetstream.OrderedConsumerConfig{FilterSubjects: []string{subjects.DeviceEvents(w.device)}})
	if err != nil {
		w.t.Fatal(err)
	}
	cc, err := c.Consume(func(m jetstream.Msg) {
		var ev model.Event
		if json.Unmarshal(m.Data(), &ev) == nil && ev.State == model.StateCommand {
			d.mu.Lock()
			d.evs = append(d.evs, ev)
			d.mu.Unlock()
		}
	})
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(cc.Stop)
	return d
}

// last is the latest event the device reported for command id.
func (d *deviceEvents) last(id string) (model.Event, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := len(d.evs) - 1; i >= 0; i-- {
		if d.evs[i].Command == id {
			return d.evs[i], true
		}
	}
	return model.Event{}, false
}

// rawPayloads is every message the fleet_payloads bucket's stream holds,
// history included.
func (w *mdmWorld) rawPayloads() [][]byte {
	w.t.Helper()
	st, err := w.coord.JetStream().Stream(w.ctx, subjects.KVStream(subjects.BucketPayloads))
	if err != nil {
		w.t.Fatal(err)
	}
	info, err := st.Info(w.ctx)
	if err != nil {
		w.t.Fatal(err)
	}
	var out [][]byte
	for seq := info.State.FirstSeq; info.State.Msgs > 0 && seq <= info.State.LastSeq; seq++ {
		if m, err := st.GetMsg(w.ctx, seq); err == nil {
			out = append(out, m.Data)
		}
	}
	return out
}

func (w *mdmWorld) payloadLs() []model.PayloadView {
	w.t.Helper()
	var vs []model.PayloadView
	out := w.mustAdmin("--json", "payload", "ls", "--name", "wifi-psk")
	if err := json.Unmarshal([]byte(out), &vs); err != nil {
		w.t.Fatalf("payload ls --json: %v\n%s", err, out)
	}
	return vs
}

// MDM end to end with the real binaries: a payload pushed with fleet-admin
// lands under the fleet-agent's --payload-dir with its mode and exact
// bytes, the coordinator stores only sealed bytes, payload ls shows it
// delivered, payload rm removes the file; a forged command is refused by
// the coordinator (audited) and, sent straight to the device's cmd inbox,
// by the agent itself (its signed event), while a valid refresh-facts
// runs; nothing reboots.
func TestMDMPayloadAndCommandsWithBinaries(t *testing.T) {
	w := newMDMWorld(t)
	w.startAgent()
	path := filepath.Join(w.payload, "wifi-psk")

	// Push: the file lands with mode 0400 and the exact content.
	secret := []byte("network={\n\tssid=\"fleet-lab\"\n\tpsk=\"mdm-e2e-" + base64.RawURLEncoding.EncodeToString([]byte(t.Name()+time.Now().String())) + "\"\n}\n")
	src := filepath.Join(t.TempDir(), "wpa.conf")
	if err := os.WriteFile(src, secret, 0o600); err != nil {
		t.Fatal(err)
	}
	w.mustAdmin("payload", "push", "--device", w.device, "--name", "wifi-psk", "--file", src, "--mode", "0400")
	poll.Until(t, 20*time.Second, "the payload at "+path, func() bool {
		got, err := os.ReadFile(path)
		return err == nil && bytes.Equal(got, secret)
	})
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o400 || !fi.Mode().IsRegular() {
		t.Fatalf("%s: %v %v, want a regular file with mode 0400", path, fi.Mode(), err)
	}

	// The coordinator holds the payload, sealed: neither the plaintext
	// nor its base64 (whole or a stretch of it) nor a recognisable line.
	raw := w.rawPayloads()
	if len(raw) == 0 {
		t.Fatal("fleet_payloads is empty: the check below would prove nothing")
	}
	b64 := base64.StdEncoding.EncodeToString(secret)
	for _, r := range raw {
		if bytes.Contains(r, secret) || bytes.Contains(r, []byte(b64[8:48])) || bytes.Contains(r, []byte("mdm-e2e-")) || bytes.Contains(r, []byte("fleet-lab")) {
			t.Fatalf("fleet_payloads holds the plaintext: %.300s", r)
		}
	}

	// payload ls --json: delivered to the device.
	poll.Telling(t, 20*time.Second, "payload ls shows wifi-psk delivered", func() (bool, string) {
		vs := w.payloadLs()
		return len(vs) == 1 && vs[0].Device == w.device && vs[0].State == "delivered" && vs[0].Mode == 0o400 &&
			vs[0].DeviceName == "laptop-mdm" && !vs[0].DeliveredAt.IsZero(), mustJSON(vs)
	})

	// payload rm: the file goes, and so does the listing.
	w.mustAdmin("--yes", "payload", "rm", "wifi-psk")
	poll.Until(t, 20*time.Second, "the withdrawn payload gone from "+path, func() bool {
		_, err := os.Stat(path)
		return errors.Is(err, os.ErrNotExist)
	})
	if vs := w.payloadLs(); len(vs) != 0 {
		t.Fatalf("payload ls after rm: %s", mustJSON(vs))
	}

	// A valid command: refresh-facts runs (and proves the agent listens on
	// its cmd inbox before anything is sent there directly).
	evs := w.watchCommandEvents()
	var res []model.CommandResult
	out := w.mustAdmin("--json", "cmd", "--device", w.device, "refresh-facts", "--wait")
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res) != 1 || !res[0].OK() || res[0].State != string(model.CommandDone) {
		t.Fatalf("cmd refresh-facts --wait: %v\n%s", err, out)
	}

	// A forged command: the owner's signature over refresh-facts, the
	// payload changed to reboot.
	forged, err := model.SignCommand(w.owner, w.device, model.CommandRefreshFacts, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	var fc model.Command
	if err := json.Unmarshal(forged.Payload, &fc); err != nil {
		t.Fatal(err)
	}
	fc.Action = model.CommandReboot
	forged.Payload, _ = json.Marshal(fc)
	stranger, _ := nkeys.CreateUser()
	strangers, err := model.SignCommand(stranger, w.device, model.CommandReboot, time.Now())
	if err != nil {
		t.Fatal(err)
	}

	// Through the coordinator's API: refused, nothing sent, audited.
	cl, err := admin.Dial(w.ctx, w.coord.ClientURL(), w.creds)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	err = cl.Call(w.ctx, subjects.VerbCommand, true, model.CommandRequest{Commands: []model.Signed{forged}}, nil)
	var ae *admin.APIError
	if !errors.As(err, &ae) || ae.Code != model.CodeRefused || !strings.Contains(err.Error(), "command signature") {
		t.Fatalf("forged command through the API: %v, want a refusal of its signature", err)
	}
	var recs []model.AuditRecord
	out = w.mustAdmin("--json", "audit", "ls")
	if err := json.Unmarshal([]byte(out), &recs); err != nil {
		t.Fatalf("audit ls --json: %v\n%s", err, out)
	}
	var refused, ok int
	for _, r := range recs {
		if r.Verb == subjects.VerbCommand {
			switch r.Result {
			case model.AuditRefused:
				refused++
				if !strings.Contains(r.Error, "command signature") || len(r.Request) != 0 || r.RequestHash == "" {
					t.Errorf("refused command's audit record: %+v", r)
				}
			case model.AuditOK:
				ok++
			}
		}
	}
	if refused != 1 || ok != 1 {
		t.Fatalf("audit: %d refused and %d accepted commands, want 1 and 1 (the forged one, refresh-facts)\n%s", refused, ok, out)
	}

	// Straight into the device's cmd inbox, as a compromised coordinator
	// would: the agent checks for itself and answers with its own signed
	// refusal.
	for _, c := range []struct {
		name    string
		s       model.Signed
		wantErr string
	}{
		{"forged", forged, "signature does not match"},
		{"stranger's", strangers, "signer is not trusted"},
	} {
		b, _ := json.Marshal(c.s)
		if err := w.coord.ClientConn().Publish(subjects.DeviceCmd(subjects.DefaultSite, w.device), b); err != nil {
			t.Fatal(err)
		}
		var cmd model.Command
		_ = json.Unmarshal(c.s.Payload, &cmd)
		poll.Telling(t, 20*time.Second, "the agent refuses the "+c.name+" command", func() (bool, string) {
			ev, ok := evs.last(cmd.ID)
			if !ok {
				return false, "no event"
			}
			return ev.Result == model.CommandRefused && strings.Contains(ev.Error, c.wantErr) && ev.Check == string(model.CommandReboot) &&
				ev.Device == w.device, mustJSON(ev)
		})
	}
	if n := strings.Count(w.agentOut.String(), `"message":"remote command refused"`); n != 2 {
		t.Errorf("the agent logged %d refused commands, want 2", n)
	}

	// A valid command afterwards still runs: the agent was listening all
	// along, and its answers are in order.
	out = w.mustAdmin("--json", "cmd", "--device", w.device, "refresh-facts", "--wait")
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res) != 1 || !res[0].OK() {
		t.Fatalf("second cmd refresh-facts --wait: %v\n%s", err, out)
	}

	// Nothing rebooted: no reboot action reached the host tools.
	if b, err := os.ReadFile(w.rebootLog); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the agent ran host tools: %v\n%s", err, b)
	}
	if strings.Contains(w.agentOut.String(), "reboot starting") {
		t.Fatal("the agent started a reboot")
	}
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
