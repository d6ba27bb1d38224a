package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	pmodel "github.com/prometheus/common/model"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// visFleet is a coordinator with its HTTP listener and simulated devices
// that hold real agent credentials and publish over TCP, as agents do.
type visFleet struct {
	t   testing.TB
	c   *Coordinator
	cfg Config
}

type visDevice struct {
	id, name string
	nc       *nats.Conn
	key      nkeys.KeyPair
}

const testAPIToken = "0123456789abcdef-test-token"

func startVis(t testing.TB, withToken bool) *visFleet {
	t.Helper()
	cfg := DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Listen = "127.0.0.1:0"
	cfg.HTTP = "127.0.0.1:0"
	if withToken {
		cfg.APITokenFile = filepath.Join(t.TempDir(), "api-token")
		if err := os.WriteFile(cfg.APITokenFile, []byte(testAPIToken+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c, err := Start(context.Background(), cfg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return &visFleet{t: t, c: c, cfg: cfg}
}

func putJSON(t testing.TB, c *Coordinator, bucket, key string, v any) {
	t.Helper()
	kv, err := c.JetStream().KeyValue(context.Background(), bucket)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(v)
	if _, err := kv.Put(context.Background(), key, b); err != nil {
		t.Fatal(err)
	}
}

// addDevice records a device and connects it with its own agent creds.
func (f *visFleet) addDevice(name string, groups ...string) *visDevice {
	t := f.t
	t.Helper()
	cr, err := f.c.Authority().NewUser(subjects.RoleAgent, name, 0)
	if err != nil {
		t.Fatal(err)
	}
	d := &visDevice{id: cr.PublicKey(), name: name}
	putJSON(t, f.c, subjects.BucketDevices, d.id, model.Device{ID: d.id, Name: name, Groups: groups, Status: model.DeviceActive, EnrolledAt: time.Now()})
	seed, _ := cr.Key.Seed()
	nc, err := nats.Connect(f.c.ClientURL(), nats.UserJWTAndSeed(cr.JWT, string(seed)), nats.CustomInboxPrefix(cr.InboxPrefix()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	d.nc, d.key = nc, cr.Key
	return d
}

func (d *visDevice) facts(t testing.TB, current string, mounts ...model.Mount) model.Facts {
	t.Helper()
	f := model.Facts{Device: d.id, Time: time.Now().UTC(), Hostname: d.name, CurrentSystem: current, BootedSystem: current, Mounts: mounts}
	d.publish(t, subjects.DeviceFacts(d.id), f)
	return f
}

// publish sends v as the device's signed report on subj (facts or events).
func (d *visDevice) publish(t testing.TB, subj string, v any) {
	t.Helper()
	purpose := model.PurposeFacts
	if strings.HasSuffix(subj, ".events") {
		purpose = model.PurposeEvent
	}
	if err := reportSigned(d.nc, d.key, subj, purpose, v); err != nil {
		t.Fatalf("%s: publish %s: %v", d.name, subj, err)
	}
}

func httpGet(t testing.TB, url, token string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// scrape fetches and parses the live /metrics.
func scrape(t testing.TB, c *Coordinator) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := httpGet(t, "http://"+c.HTTPAddr()+"/metrics", "")
	if code != 200 {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	p := expfmt.NewTextParser(pmodel.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

// series returns the value of name's series whose labels include want
// (nil: no such series).
func series(fams map[string]*dto.MetricFamily, name string, want map[string]string) *float64 {
	fam := fams[name]
	if fam == nil {
		return nil
	}
next:
	for _, m := range fam.Metric {
		have := map[string]string{}
		for _, l := range m.Label {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		var v float64
		switch {
		case m.Gauge != nil:
			v = m.Gauge.GetValue()
		case m.Counter != nil:
			v = m.Counter.GetValue()
		case m.Untyped != nil:
			v = m.Untyped.GetValue()
		}
		return &v
	}
	return nil
}

func countSeries(fams map[string]*dto.MetricFamily, name, label, value string) int {
	n := 0
	if fam := fams[name]; fam != nil {
		for _, m := range fam.Metric {
			for _, l := range m.Label {
				if l.GetName() == label && l.GetValue() == value {
					n++
				}
			}
		}
	}
	return n
}

func TestVisibilityMetricsAPIAndStatus(t *testing.T) {
	f := startVis(t, true)
	gen1, gen2 := storePath("gen1"), storePath("gen2")
	a := f.addDevice("alpha", "developers")
	b := f.addDevice("bravo", "developers")
	cc := f.addDevice("charlie", "servers")

	a.facts(t, gen1, model.Mount{Path: "/", SizeBytes: 100, UsedBytes: 91}, model.Mount{Path: "/boot", SizeBytes: 100, UsedBytes: 10})
	b.facts(t, gen2)
	rb := model.Facts{Device: cc.id, Time: time.Now().UTC(), Hostname: "charlie", CurrentSystem: gen1, RebootNeeded: true}
	cc.publish(t, subjects.DeviceFacts(cc.id), rb)
	// bravo failed its latest apply; alpha should run gen2.
	b.publish(t, subjects.DeviceEvents(b.id), model.Event{Device: b.id, Time: time.Now(), State: model.StateReporting,
		Result: model.ResultRolledBack, Error: "health check failed", StorePath: gen1})
	putJSON(t, f.c, subjects.BucketDesired, a.id, model.Desired{Device: a.id, ReleaseID: "rel-2", RolloutID: "r-1", StorePath: gen2})
	putJSON(t, f.c, subjects.BucketDesired, b.id, model.Desired{Device: b.id, ReleaseID: "rel-2", RolloutID: "r-1", StorePath: gen2})
	putJSON(t, f.c, subjects.BucketRollouts, "r-1", model.Rollout{ID: "r-1", ReleaseID: "rel-2", State: model.RolloutRunning,
		Total: 2, BatchSizes: []int{2}, UpdatedAt: time.Now(),
		Counts: map[model.DeviceRolloutState]int{model.DeviceWaiting: 1, model.DeviceSucceeded: 1}})
	// Per-device progress shares the bucket; the index must not take it
	// for a rollout summary.
	putJSON(t, f.c, subjects.BucketRollouts, "r-1."+a.id, model.RolloutDevice{Device: a.id, State: model.DeviceWaiting})

	poll.Telling(t, 10*time.Second, "status of three devices", func() (bool, string) {
		st := f.c.Status("")
		ok := st.Summary.Total == 3 && st.Summary.Failing == 1 && len(f.c.Rollouts()) == 1
		for _, r := range st.Devices {
			ok = ok && r.CurrentSystem != "" && (r.Name != "alpha" || r.DesiredSystem == gen2)
		}
		return ok, fmt.Sprintf("%+v rollouts %d", st.Summary, len(f.c.Rollouts()))
	})

	st := f.c.Status("")
	// bravo runs what it should (its failed apply was rolled back to it),
	// charlie has no desired state: both up to date.
	want := model.StatusSummary{Total: 3, Online: 3, UpToDate: 2, Failing: 1, Pending: 1}
	if st.Summary != want {
		t.Errorf("summary %+v, want %+v", st.Summary, want)
	}
	if g := f.c.Status("developers"); g.Summary.Total != 2 || g.Group != "developers" {
		t.Errorf("group developers: %+v", g.Summary)
	}

	fams := scrape(t, f.c)
	check := func(name string, labels map[string]string, want float64) {
		t.Helper()
		v := series(fams, name, labels)
		if v == nil {
			t.Errorf("%s%v: missing", name, labels)
		} else if *v != want {
			t.Errorf("%s%v = %v, want %v", name, labels, *v, want)
		}
	}
	check("fleet_devices", map[string]string{"status": "active"}, 3)
	check("fleet_devices", map[string]string{"status": "revoked"}, 0)
	check("fleet_devices_online", nil, 3)
	check("fleet_device_generation_info", map[string]string{"device": a.id, "name": "alpha", "store_path": gen1}, 1)
	check("fleet_device_generation_info", map[string]string{"device": b.id, "store_path": gen2}, 1)
	check("fleet_device_desired_info", map[string]string{"device": a.id, "store_path": gen2}, 1)
	check("fleet_device_up_to_date", map[string]string{"device": a.id}, 0)
	check("fleet_device_up_to_date", map[string]string{"device": b.id}, 1)
	check("fleet_device_up_to_date", map[string]string{"device": cc.id}, 1)
	check("fleet_device_disk_used_ratio", map[string]string{"device": a.id, "mount": "/"}, 0.91)
	check("fleet_device_disk_used_ratio", map[string]string{"device": a.id, "mount": "/boot"}, 0.1)
	check("fleet_device_reboot_needed", map[string]string{"device": cc.id}, 1)
	check("fleet_device_reboot_needed", map[string]string{"device": a.id}, 0)
	check("fleet_device_last_apply_success", map[string]string{"device": b.id, "name": "bravo"}, 0)
	// bravo's latest event is a result: the apply is over, it is idle.
	check("fleet_devices_agent_state", map[string]string{"state": "idle"}, 1)
	check("fleet_devices_agent_state", map[string]string{"state": "reporting"}, 0)
	check("fleet_devices_agent_state", map[string]string{"state": "applying"}, 0)
	check("fleet_rollout_devices", map[string]string{"rollout": "r-1", "state": "waiting"}, 1)
	check("fleet_rollout_devices", map[string]string{"rollout": "r-1", "state": "failed"}, 0)
	check("fleet_rollout_info", map[string]string{"rollout": "r-1", "release": "rel-2", "state": "running"}, 1)
	if n := countSeries(fams, "fleet_rollout_info", "rollout", "r-1"); n != 1 {
		t.Errorf("fleet_rollout_info: %d series for r-1", n)
	}
	if series(fams, "fleet_device_last_apply_success", map[string]string{"device": a.id}) != nil {
		t.Errorf("alpha never applied, yet has fleet_device_last_apply_success")
	}
	if v := series(fams, "fleet_device_last_seen_timestamp_seconds", map[string]string{"device": a.id}); v == nil || time.Since(time.UnixMilli(int64(*v*1e3))).Abs() > time.Minute {
		t.Errorf("alpha last seen %v", v)
	}
	for _, name := range []string{"fleet_nats_connections", "fleet_jetstream_storage_bytes", "fleet_jetstream_streams",
		"fleet_jetstream_consumers", "go_goroutines", "process_resident_memory_bytes"} {
		if fams[name] == nil {
			t.Errorf("%s missing", name)
		}
	}
	if v := series(fams, "fleet_nats_connections", nil); v == nil || *v < 3 {
		t.Errorf("fleet_nats_connections %v, want >= 3 (three devices)", v)
	}

	// The API: wrong token, no token, right token.
	base := "http://" + f.c.HTTPAddr()
	if code, body := httpGet(t, base+"/api/v1/devices", "wrong-token-wrong-token"); code != http.StatusUnauthorized {
		t.Errorf("wrong token: %d %s", code, body)
	}
	if code, _ := httpGet(t, base+"/api/v1/devices", ""); code != http.StatusUnauthorized {
		t.Errorf("no token: %d", code)
	}
	code, body := httpGet(t, base+"/api/v1/devices", testAPIToken)
	if code != 200 {
		t.Fatalf("devices: %d %s", code, body)
	}
	var rows []model.DeviceStatusRow
	if err := json.Unmarshal(body, &rows); err != nil {
		t.Fatalf("devices JSON: %v: %s", err, body)
	}
	byName := map[string]model.DeviceStatusRow{}
	for _, r := range rows {
		byName[r.Name] = r
	}
	if len(rows) != 3 {
		t.Fatalf("devices: %d rows: %s", len(rows), body)
	}
	if r := byName["alpha"]; r.ID != a.id || r.CurrentSystem != gen1 || r.DesiredSystem != gen2 || r.UpToDate ||
		r.DiskMaxUsedRatio != 0.91 || r.Rollout != "r-1" || !r.Online || !slices.Equal(r.Groups, []string{"developers"}) || r.LastSeen.IsZero() {
		t.Errorf("alpha row %+v", r)
	}
	if r := byName["bravo"]; r.LastResult != model.ResultRolledBack || r.LastError != "health check failed" || !r.UpToDate {
		t.Errorf("bravo row %+v", r)
	}
	if r := byName["charlie"]; !r.RebootNeeded || r.CurrentSystem != gen1 {
		t.Errorf("charlie row %+v", r)
	}
	code, body = httpGet(t, base+"/api/v1/devices?group=servers", testAPIToken)
	if code != 200 || !strings.Contains(string(body), "charlie") || strings.Contains(string(body), "alpha") {
		t.Errorf("group filter: %d %s", code, body)
	}
	code, body = httpGet(t, base+"/api/v1/rollouts", testAPIToken)
	var ros []model.RolloutStatusRow
	if code != 200 || json.Unmarshal(body, &ros) != nil || len(ros) != 1 || ros[0].ID != "r-1" || ros[0].Devices != 2 || ros[0].Counts[model.DeviceWaiting] != 1 {
		t.Errorf("rollouts: %d %s", code, body)
	}

	// Online from an advisory source once one is set.
	f.c.SetOnlineSource(onlySource{b.id})
	fams = scrape(t, f.c)
	check("fleet_devices_online", nil, 1)
	check("fleet_device_online", map[string]string{"device": b.id}, 1)
	check("fleet_device_online", map[string]string{"device": a.id}, 0)
}

type onlySource struct{ id string }

func (o onlySource) Online(id string) bool { return id == o.id }

func TestAPIDisabledWithoutToken(t *testing.T) {
	f := startVis(t, false)
	for _, p := range []string{"/api/v1/devices", "/api/v1/rollouts"} {
		code, body := httpGet(t, "http://"+f.c.HTTPAddr()+p, testAPIToken)
		if code != http.StatusForbidden || !strings.Contains(string(body), "--api-token-file") {
			t.Errorf("%s without --api-token-file: %d %q", p, code, body)
		}
	}
	// /metrics needs no token.
	if code, _ := httpGet(t, "http://"+f.c.HTTPAddr()+"/metrics", ""); code != 200 {
		t.Errorf("/metrics: %d", code)
	}
}

func TestAPITokenFileErrors(t *testing.T) {
	cfg := DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Listen = "127.0.0.1:0"
	cfg.HTTP = ""
	cfg.APITokenFile = filepath.Join(t.TempDir(), "missing")
	if _, err := Start(context.Background(), cfg, zerolog.Nop()); err == nil || !strings.Contains(err.Error(), "--api-token-file") {
		t.Errorf("missing token file: %v", err)
	}
	os.WriteFile(cfg.APITokenFile, []byte("short\n"), 0o600)
	if _, err := Start(context.Background(), cfg, zerolog.Nop()); err == nil || !strings.Contains(err.Error(), "at least 16") {
		t.Errorf("short token: %v", err)
	}
}

// Revoking or deleting a record removes the device's series: cardinality
// is bounded by the device bucket, not by who once reported.
func TestRevokedAndDeletedDevicesLeaveMetrics(t *testing.T) {
	f := startVis(t, false)
	gen := storePath("gen1")
	a := f.addDevice("alpha")
	b := f.addDevice("bravo")
	keep := f.addDevice("charlie")
	for _, d := range []*visDevice{a, b, keep} {
		d.facts(t, gen, model.Mount{Path: "/", SizeBytes: 10, UsedBytes: 5})
	}
	perDevice := func(fams map[string]*dto.MetricFamily, id string) int {
		n := 0
		for name := range fams {
			n += countSeries(fams, name, "device", id)
		}
		return n
	}
	poll.Telling(t, 10*time.Second, "series of three devices", func() (bool, string) {
		fams := scrape(t, f.c)
		n := countSeries(fams, "fleet_device_generation_info", "store_path", gen)
		return n == 3, fmt.Sprint(n, " generation series")
	})

	rec := model.Device{ID: a.id, Name: "alpha", Status: model.DeviceRevoked, RevokedAt: time.Now()}
	putJSON(t, f.c, subjects.BucketDevices, a.id, rec)
	kv, _ := f.c.JetStream().KeyValue(context.Background(), subjects.BucketDevices)
	if err := kv.Delete(context.Background(), b.id); err != nil {
		t.Fatal(err)
	}
	poll.Telling(t, 10*time.Second, "revoked and deleted devices' series to go", func() (bool, string) {
		fams := scrape(t, f.c)
		na, nb, nk := perDevice(fams, a.id), perDevice(fams, b.id), perDevice(fams, keep.id)
		return na == 0 && nb == 0 && nk > 0, fmt.Sprintf("alpha %d bravo %d charlie %d series", na, nb, nk)
	})
	fams := scrape(t, f.c)
	if v := series(fams, "fleet_devices", map[string]string{"status": "revoked"}); v == nil || *v != 1 {
		t.Errorf("fleet_devices{status=revoked} %v", v)
	}
	if v := series(fams, "fleet_devices", map[string]string{"status": "active"}); v == nil || *v != 1 {
		t.Errorf("fleet_devices{status=active} %v", v)
	}
	// A deleted device that still reports is not heard: its report is
	// dropped unanswered and unstored, and it gets no series back.
	before := f.c.index.stats.facts.Load()
	if err := reportSigned(b.nc, b.key, subjects.DeviceFacts(b.id), model.PurposeFacts, model.Facts{Device: b.id, CurrentSystem: gen}); err == nil {
		t.Error("a deleted device's facts were acknowledged")
	}
	if n := f.c.index.stats.facts.Load(); n != before {
		t.Errorf("a deleted device's facts reached the index (%d → %d)", before, n)
	}
	if n := perDevice(scrape(t, f.c), b.id); n != 0 {
		t.Errorf("deleted device has %d series after reporting again", n)
	}
	if st := f.c.Status(""); st.Summary.Total != 1 {
		t.Errorf("status after revoke/delete: %+v", st.Summary)
	}
}

// A restarted coordinator rebuilds each device's latest state from the
// streams (last message per subject), without history.
func TestIndexRebuildsAfterRestart(t *testing.T) {
	f := startVis(t, false)
	d := f.addDevice("alpha")
	d.facts(t, storePath("old"))
	d.facts(t, storePath("new"))
	f.c.Close()
	c, err := Start(context.Background(), f.cfg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	poll.Telling(t, 10*time.Second, "index rebuilt", func() (bool, string) {
		st := c.Status("")
		return len(st.Devices) == 1 && st.Devices[0].CurrentSystem == storePath("new"), fmt.Sprintf("%+v", st.Devices)
	})
	if n := c.index.stats.facts.Load(); n != 1 {
		t.Errorf("restart replayed %d facts, want 1 (last per subject)", n)
	}
}

func TestFactsHistory(t *testing.T) {
	f := startVis(t, false)
	d := f.addDevice("alpha")
	var sent []string
	for i := range 3 {
		p := storePath(fmt.Sprint("gen", i))
		d.facts(t, p)
		sent = append(sent, p)
	}
	ctx := context.Background()
	hist, err := f.c.FactsHistory(ctx, d.id, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, h := range hist {
		got = append(got, h.CurrentSystem)
		if h.Device != d.id {
			t.Errorf("facts of %s", h.Device)
		}
	}
	if !slices.Equal(got, sent) {
		t.Errorf("history %v, want %v", got, sent)
	}
	// Nothing that recent: an empty answer, at once.
	start := time.Now() // after the last report's ack
	hist, err = f.c.FactsHistory(ctx, d.id, time.Since(start))
	if err != nil || len(hist) != 0 {
		t.Errorf("recent window: %d facts, %v", len(hist), err)
	}
	if time.Since(start) > 3*time.Second {
		t.Errorf("empty history took %s", time.Since(start))
	}

	// Bad input.
	kp, _ := nkeys.CreateUser()
	unknown, _ := kp.PublicKey()
	if _, err := f.c.FactsHistory(ctx, unknown, time.Hour); !errors.Is(err, ErrUnknownDevice) {
		t.Errorf("unknown device: %v", err)
	}
	for _, bad := range []string{"", "alpha", "fleet.dev.>", d.id + "x"} {
		if _, err := f.c.FactsHistory(ctx, bad, time.Hour); err == nil || !strings.Contains(err.Error(), "not a device ID") {
			t.Errorf("id %q: %v", bad, err)
		}
	}
	for _, since := range []time.Duration{0, -time.Hour} {
		if _, err := f.c.FactsHistory(ctx, d.id, since); err == nil || !strings.Contains(err.Error(), "positive") {
			t.Errorf("since %s: %v", since, err)
		}
	}
	// No consumer left behind.
	poll.Telling(t, 5*time.Second, "history consumers deleted", func() (bool, string) {
		s, err := f.c.JetStream().Stream(ctx, subjects.StreamFacts)
		if err != nil {
			return false, err.Error()
		}
		n := 0
		for name := range s.ConsumerNames(ctx).Name() {
			if strings.HasPrefix(name, "fleet-facts-history") {
				n++
			}
		}
		return n == 0, fmt.Sprint(n, " left")
	})
}

// metricRefRE finds identifiers in PromQL; strip strings, label matchers,
// ranges and groupings first.
var (
	promStrings  = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
	promBraces   = regexp.MustCompile(`\{[^}]*\}`)
	promRanges   = regexp.MustCompile(`\[[^\]]*\]`)
	promGrouping = regexp.MustCompile(`\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promIdent    = regexp.MustCompile(`[A-Za-z_:][A-Za-z0-9_:]*`)
	promKeywords = map[string]bool{"by": true, "without": true, "on": true, "ignoring": true, "group_left": true,
		"group_right": true, "bool": true, "and": true, "or": true, "unless": true, "offset": true}
)

// metricNames returns the metric names expr refers to.
func metricNames(expr string) []string {
	s := promStrings.ReplaceAllString(expr, `""`)
	s = promBraces.ReplaceAllString(s, " ")
	s = promRanges.ReplaceAllString(s, " ")
	s = promGrouping.ReplaceAllString(s, " ")
	var out []string
	for _, loc := range promIdent.FindAllStringIndex(s, -1) {
		id := s[loc[0]:loc[1]]
		rest := strings.TrimLeft(s[loc[1]:], " \t\n")
		if promKeywords[id] || strings.HasPrefix(rest, "(") {
			continue // a keyword or a function
		}
		if loc[0] > 0 && (s[loc[0]-1] >= '0' && s[loc[0]-1] <= '9' || s[loc[0]-1] == '.') {
			continue // the tail of a number, e.g. 1e3
		}
		out = append(out, id)
	}
	return out
}

func TestMetricNamesParser(t *testing.T) {
	got := metricNames(`sum by (rollout, state) (fleet_rollout_devices{job=~"$job"}) * on (rollout) group_left() max by (rollout) (fleet_rollout_info{x="a}b"}) / 1e3 or vector(0) + rate(x_total[$__rate_interval])`)
	if want := []string{"fleet_rollout_devices", "fleet_rollout_info", "x_total"}; !slices.Equal(got, want) {
		t.Errorf("metricNames = %v, want %v", got, want)
	}
}

type dashPanel struct {
	Title   string `json:"title"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
	Panels []dashPanel `json:"panels"`
}

// Every panel of the shipped dashboard queries metrics that the
// coordinator really exports (read from a live /metrics).
func TestDashboardQueriesExportedMetrics(t *testing.T) {
	raw, err := os.ReadFile("../grafana/fleet-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID        string      `json:"uid"`
		Panels     []dashPanel `json:"panels"`
		Templating struct {
			List []struct {
				Name, Type string
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	if !slices.ContainsFunc(dash.Templating.List, func(v struct{ Name, Type string }) bool {
		return v.Name == "datasource" && v.Type == "datasource"
	}) {
		t.Errorf("dashboard has no Prometheus datasource variable")
	}
	if strings.Contains(string(raw), `"uid": "prometheus"`) {
		t.Errorf("a panel names a fixed datasource instead of ${datasource}")
	}

	// A fleet with one of everything, so every family has a series.
	f := startVis(t, false)
	d := f.addDevice("alpha")
	gen := storePath("gen1")
	d.facts(t, gen, model.Mount{Path: "/", SizeBytes: 10, UsedBytes: 9})
	d.publish(t, subjects.DeviceEvents(d.id), model.Event{Device: d.id, Time: time.Now(), State: model.StateReporting, Result: model.ResultFailed})
	putJSON(t, f.c, subjects.BucketDesired, d.id, model.Desired{Device: d.id, StorePath: gen})
	putJSON(t, f.c, subjects.BucketRollouts, "r-1", model.Rollout{ID: "r-1", ReleaseID: "rel", State: model.RolloutRunning, UpdatedAt: time.Now()})
	// A payload holding a certificate, as payload push stores it (signed by
	// the owner), and a recovery key the device escrowed (signed by it).
	owner, err := accounts.ReadCreds(filepath.Join(f.cfg.DataDir, accounts.AdminCredsFile))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	pl, err := model.Sign(owner.Key, model.PurposePayload, model.Payload{Name: "wifi-cert", Device: d.id, Mode: 0o400,
		SHA256: strings.Repeat("0", 64), Size: 1, NotAfter: now.Add(20 * 24 * time.Hour), Sealed: []byte{1}, Time: now})
	if err != nil {
		t.Fatal(err)
	}
	putJSON(t, f.c, subjects.BucketPayloads, payloadKey(d.id, "wifi-cert"), model.PayloadRecord{Signed: pl, PushedBy: owner.PublicKey(), PushedAt: now})
	esc, err := model.Sign(d.key, model.PurposeEscrow, model.EscrowPut{Device: d.id, Disk: "nvme0n1p2", Sealed: []byte{1}, Time: now})
	if err != nil {
		t.Fatal(err)
	}
	putJSON(t, f.c, subjects.BucketEscrow, escrowKey(d.id, "nvme0n1p2"), model.EscrowRecord{Signed: esc, EscrowedAt: now, ConfirmedAt: now})
	var fams map[string]*dto.MetricFamily
	poll.Telling(t, 10*time.Second, "every device family", func() (bool, string) {
		fams = scrape(t, f.c)
		for _, n := range []string{"fleet_device_desired_info", "fleet_device_last_apply_success", "fleet_rollout_info", "fleet_device_disk_used_ratio",
			"fleet_payload_cert_expiry_timestamp_seconds", "fleet_escrow_confirmed_timestamp_seconds"} {
			if fams[n] == nil {
				return false, n + " missing"
			}
		}
		return true, ""
	})
	exported := map[string]bool{}
	for name, fam := range fams {
		exported[name] = true
		if fam.GetType() == dto.MetricType_SUMMARY || fam.GetType() == dto.MetricType_HISTOGRAM {
			for _, s := range []string{"_sum", "_count", "_bucket"} {
				exported[name+s] = true
			}
		}
	}
	var walk func([]dashPanel)
	n := 0
	walk = func(ps []dashPanel) {
		for _, p := range ps {
			walk(p.Panels)
			for _, tg := range p.Targets {
				names := metricNames(tg.Expr)
				if len(names) == 0 {
					t.Errorf("panel %q: query %q names no metric", p.Title, tg.Expr)
				}
				for _, name := range names {
					n++
					if !exported[name] {
						t.Errorf("panel %q: query %q uses %s, which the coordinator does not export", p.Title, tg.Expr, name)
					}
				}
			}
		}
	}
	walk(dash.Panels)
	if n < 10 {
		t.Errorf("only %d metric references in the dashboard", n)
	}
}

// A device decides what it reports, not what the coordinator exports: 2,000
// mounts cost at most maxMountSeries series, bad labels none, and escapes
// in its text never reach a reader.
func TestDeviceCannotBlowUpMetrics(t *testing.T) {
	f := startVis(t, false)
	d := f.addDevice("greedy")
	mounts := make([]model.Mount, 0, 2000)
	for i := range 2000 {
		mounts = append(mounts, model.Mount{Path: fmt.Sprintf("/m/%04d", i), SizeBytes: 100, UsedBytes: 50})
	}
	mounts = append(mounts[:10:10], model.Mount{Path: "relative", SizeBytes: 1}, model.Mount{Path: "/" + strings.Repeat("x", 300), SizeBytes: 1})
	mounts = append(mounts, model.Mount{Path: "/esc\x1b[2J", SizeBytes: 1})
	for i := range 1990 {
		mounts = append(mounts, model.Mount{Path: fmt.Sprintf("/n/%04d", i), SizeBytes: 100, UsedBytes: 50})
	}
	fa := model.Facts{Device: d.id, Time: time.Now().UTC(), Hostname: "greedy\x1b]0;owned\x07", Kernel: "\x1b[31mred", CurrentSystem: storePath("g"), Mounts: mounts}
	d.publish(t, subjects.DeviceFacts(d.id), fa)
	poll.Telling(t, 10*time.Second, "greedy's facts indexed", func() (bool, string) {
		lf := f.c.index.latestFacts(d.id)
		return lf != nil, "none yet"
	})
	n := countSeries(scrape(t, f.c), "fleet_device_disk_used_ratio", "device", d.id)
	if n != maxMountSeries {
		t.Errorf("%d disk series for one device, want %d", n, maxMountSeries)
	}
	lf := f.c.index.latestFacts(d.id)
	if strings.ContainsAny(lf.Hostname+lf.Kernel, "\x1b\x07") {
		t.Errorf("escapes stored: %q %q", lf.Hostname, lf.Kernel)
	}
	for _, m := range scrape(t, f.c)["fleet_device_disk_used_ratio"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "mount" && (len(l.GetValue()) > 256 || !strings.HasPrefix(l.GetValue(), "/")) {
				t.Errorf("mount label %q", l.GetValue())
			}
		}
	}
}

// A slow HTTP client is cut off: it cannot hold the process's descriptors.
func TestHTTPSlowClientCutOff(t *testing.T) {
	f := startVis(t, false)
	conn, err := net.Dial("tcp", f.c.HTTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("GET /metrics HTTP/1.1\r\nHost: x\r\n")); err != nil {
		t.Fatal(err)
	}
	// The header never ends; the server gives up after ReadHeaderTimeout.
	_ = conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	start := time.Now()
	_, err = io.ReadAll(conn)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("the server still held the half-sent request after %s", time.Since(start))
	}
}

// Ready means indexed: after a restart with thousands of devices, the first
// moment the coordinator says ready, status already counts every device
// with its latest facts.
func TestReadyMeansIndexed(t *testing.T) {
	const n = 3000
	cfg := testConfig(t.TempDir())
	c := startCoordinator(t, cfg)
	ctx := ctxT(t, 2*time.Minute)
	js, err := jetstream.New(c.Conn(), jetstream.WithPublishAsyncMaxPending(4096))
	if err != nil {
		t.Fatal(err)
	}
	var futs []jetstream.PubAckFuture
	for i := range n {
		kp := newKey(t)
		id := pubOf(kp)
		rec, _ := json.Marshal(model.Device{ID: id, Name: fmt.Sprintf("d%04d", i), Site: subjects.DefaultSite, Status: model.DeviceActive, EnrolledAt: time.Now()})
		facts, _ := json.Marshal(model.Facts{Device: id, CurrentSystem: storePath("s"), Time: time.Now()})
		for _, m := range []struct {
			subj string
			b    []byte
		}{{subjects.KVKey(subjects.BucketDevices, id), rec}, {subjects.DeviceFacts(id), facts}} {
			f, err := js.PublishAsync(m.subj, m.b)
			if err != nil {
				t.Fatal(err)
			}
			futs = append(futs, f)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		t.Fatal("writes not acknowledged")
	}
	for _, f := range futs {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			t.Fatal(err)
		}
	}
	stop(t, c)

	c2, err := Start(ctx, cfg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c2.Close)
	poll.Until(t, time.Minute, "ready", func() bool { return c2.Ready() == nil })
	st := c2.Status("")
	withFacts := 0
	for _, d := range st.Devices {
		if d.CurrentSystem != "" {
			withFacts++
		}
	}
	if st.Summary.Total != n || withFacts != n {
		t.Fatalf("ready with %d devices and %d facts indexed, want %d", st.Summary.Total, withFacts, n)
	}
}
