package broker

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/admin"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/subjects"
)

// Listings larger than a NATS message (1 MiB), read through fleet-admin.

func init() {
	// A verb whose reply cannot fit a message, for TestReplyTooLarge.
	testVerbs = func(s *services) []apiVerb {
		return []apiVerb{{"test-huge", false, subjects.RoleViewer, func(context.Context, *model.Admin, json.RawMessage) (any, error) {
			return strings.Repeat("x", 2<<20), nil
		}}}
	}
}

func startPaging(t *testing.T) *Coordinator {
	t.Helper()
	cfg := DefaultConfig()
	cfg.DataDir, cfg.Listen, cfg.HTTP = t.TempDir(), "127.0.0.1:0", ""
	cfg.FactsHistory = 2500
	c, err := Start(context.Background(), cfg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// fleetAdmin runs fleet-admin as the first owner.
func fleetAdmin(t *testing.T, c *Coordinator, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	full := append([]string{"--server", c.ClientURL(), "--creds", filepath.Join(c.Config().DataDir, accounts.AdminCredsFile)}, args...)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if code := admin.Run(ctx, full, &out, &errb); code != 0 {
		return out.String(), errb.String(), fmt.Errorf("fleet-admin %s: exit %d: %s", strings.Join(args, " "), code, errb.String())
	}
	return out.String(), errb.String(), nil
}

// bulkPublish stores msgs with async publishes on the coordinator's own
// connection.
func bulkPublish(t *testing.T, c *Coordinator, subj func(i int) string, data func(i int) []byte, n int) {
	t.Helper()
	js, err := jetstream.New(c.Conn(), jetstream.WithPublishAsyncMaxPending(2048))
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if _, err := js.PublishAsync(subj(i), data(i)); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		if i%1000 == 999 {
			<-js.PublishAsyncComplete()
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(30 * time.Second):
		t.Fatal("publish acks did not arrive")
	}
}

func deviceIDs(t *testing.T, n int) []string {
	t.Helper()
	ids := make([]string, n)
	for i := range ids {
		kp, err := nkeys.CreateUser()
		if err != nil {
			t.Fatal(err)
		}
		ids[i], _ = kp.PublicKey()
	}
	return ids
}

func putDeviceRecords(t *testing.T, c *Coordinator, ids []string, status func(i int) model.DeviceStatus) {
	t.Helper()
	bulkPublish(t, c, func(i int) string { return subjects.KVKey(subjects.BucketDevices, ids[i]) }, func(i int) []byte {
		b, _ := json.Marshal(model.Device{ID: ids[i], Name: fmt.Sprintf("host%05d", i), Groups: []string{"lab"}, Status: status(i), EnrolledAt: time.Now()})
		return b
	}, len(ids))
}

func pageFacts(id string, i int) []byte {
	f := model.Facts{
		Device: id, Time: time.Now().UTC(), Hostname: fmt.Sprintf("host%05d", i), NixOSVersion: "25.11",
		CurrentSystem: storePath("gen1"), BootedSystem: storePath("gen1"), Kernel: "6.12.30",
		UptimeSeconds: float64(i), MemoryTotal: 16 << 30, MemoryAvail: 9 << 30,
		Mounts:       []model.Mount{{Path: "/", Device: "/dev/mapper/root", FSType: "ext4", SizeBytes: 500 << 30, UsedBytes: 100 << 30}},
		AgentVersion: "dev", LastApply: &model.LastApply{Result: model.ResultSucceeded, Time: time.Now().UTC()},
	}
	b, _ := json.Marshal(f)
	return b
}

// status over 3,000 devices with facts (a reply of well over 1 MiB in one
// piece) returns every row, in ID order, and a summary of them all.
func TestStatusPagesLargeFleet(t *testing.T) {
	c := startPaging(t)
	const n = 3000
	ids := deviceIDs(t, n)
	// Every 10th awaits approval, every 100th is revoked (no row).
	status := func(i int) model.DeviceStatus {
		switch {
		case i%100 == 0:
			return model.DeviceRevoked
		case i%10 == 0:
			return model.DevicePending
		}
		return model.DeviceActive
	}
	putDeviceRecords(t, c, ids, status)
	bulkPublish(t, c, func(i int) string { return subjects.DeviceFacts(ids[i]) }, func(i int) []byte { return pageFacts(ids[i], i) }, n)
	want := model.StatusSummary{Total: n - n/100, UpToDate: n - n/100, AwaitingApproval: n/10 - n/100} // none connected: offline
	poll.Telling(t, 20*time.Second, "index has every device", func() (bool, string) {
		s := c.Status("").Summary
		return s == want, fmt.Sprintf("%+v, want %+v", s, want)
	})

	out, _, err := fleetAdmin(t, c, "--json", "status")
	if err != nil {
		t.Fatal(err)
	}
	if len(out) <= 1<<20 {
		t.Fatalf("status is %d bytes: the test should need more than one message", len(out))
	}
	var rep model.StatusReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Summary != want || len(rep.Devices) != want.Total || rep.Next != "" {
		t.Fatalf("status: summary %+v, %d rows, next %q; want %+v", rep.Summary, len(rep.Devices), rep.Next, want)
	}
	seen := map[string]bool{}
	for i, r := range rep.Devices {
		// fleet-admin sorts rows by name, then ID.
		if seen[r.ID] || (i > 0 && cmp.Or(strings.Compare(rep.Devices[i-1].Name, r.Name), strings.Compare(rep.Devices[i-1].ID, r.ID)) >= 0) {
			t.Fatalf("row %d (%s) repeated or out of order", i, r.ID)
		}
		seen[r.ID] = true
	}

	// One page at a time: the summary counts everything on every page.
	cl, err := admin.Dial(context.Background(), c.ClientURL(), filepath.Join(c.Config().DataDir, accounts.AdminCredsFile))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var page model.StatusReport
	if err := cl.Call(context.Background(), subjects.VerbStatus, false, model.StatusQuery{Page: model.Page{Limit: 100000}}, &page); err != nil {
		t.Fatal(err)
	}
	if len(page.Devices) != capStatus || page.Next == "" || page.Summary != want {
		t.Fatalf("first page: %d rows, next %q, summary %+v", len(page.Devices), page.Next, page.Summary)
	}

	// devices ls pages too, in name order; --limit sets the page size.
	out, _, err = fleetAdmin(t, c, "--json", "--limit", "333", "devices", "ls", "--group", "lab")
	if err != nil {
		t.Fatal(err)
	}
	var devs []model.DeviceView
	if err := json.Unmarshal([]byte(out), &devs); err != nil {
		t.Fatal(err)
	}
	if len(devs) != n || !slices.IsSortedFunc(devs, func(a, b model.DeviceView) int { return strings.Compare(a.Name, b.Name) }) {
		t.Fatalf("devices ls: %d devices (want %d) or not by name", len(devs), n)
	}
}

// facts over 2,000 reports of one device (1,440 was the old breaking point)
// come back whole and oldest first.
func TestFactsHistoryPaged(t *testing.T) {
	c := startPaging(t)
	ids := deviceIDs(t, 1)
	putDeviceRecords(t, c, ids, func(int) model.DeviceStatus { return model.DeviceActive })
	const n = 2000
	bulkPublish(t, c, func(int) string { return subjects.DeviceFacts(ids[0]) }, func(i int) []byte { return pageFacts(ids[0], i) }, n)

	out, _, err := fleetAdmin(t, c, "--json", "facts", "host00000", "--since", "1h")
	if err != nil {
		t.Fatal(err)
	}
	var facts []model.Facts
	if err := json.Unmarshal([]byte(out), &facts); err != nil {
		t.Fatal(err)
	}
	if len(facts) != n {
		t.Fatalf("facts: %d reports, want %d", len(facts), n)
	}
	for i, f := range facts {
		if f.UptimeSeconds != float64(i) || f.Device != ids[0] {
			t.Fatalf("report %d is %v of %s: out of order", i, f.UptimeSeconds, f.Device)
		}
	}
	// The table reads them all too.
	if out, _, err = fleetAdmin(t, c, "facts", ids[0][:12], "--since", "1h"); err != nil || strings.Count(out, "\n") != n+1 {
		t.Fatalf("facts table: %v, %d lines", err, strings.Count(out, "\n"))
	}
	hist, err := c.FactsHistory(context.Background(), ids[0], time.Hour)
	if err != nil || len(hist) != n {
		t.Fatalf("FactsHistory: %d, %v", len(hist), err)
	}
}

// audit ls and verify read every entry, pages cut by bytes as well as by
// count (some entries are 60 KB).
func TestAuditPaged(t *testing.T) {
	c := startPaging(t)
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	const n = 3200
	recs := make([][]byte, n)
	prev := ""
	for i := range recs {
		pad := strings.Repeat("a", 200)
		if i%160 == 7 {
			pad = strings.Repeat("b", 60<<10)
		}
		args, _ := json.Marshal(map[string]any{"i": i, "pad": pad})
		req := model.Request{Verb: subjects.VerbDeviceGroups, Time: time.Now().UTC(), Nonce: fmt.Sprintf("n%d", i), Args: args}
		s, err := model.Sign(kp, model.PurposeAPI, req)
		if err != nil {
			t.Fatal(err)
		}
		env, _ := json.Marshal(s)
		r := model.AuditRecord{Time: time.Now().UTC(), Verb: req.Verb, Signer: pub, Admin: "ci", Role: "operator", Result: model.AuditOK, Request: env}
		if i == n-1 { // a forged request, refused
			r.Result, r.Request = model.AuditRefused, json.RawMessage(`"junk"`)
		}
		// A chain, as the coordinator appends it.
		r.Prev = prev
		prev = model.AuditHash(r)
		recs[i], _ = json.Marshal(r)
	}
	bulkPublish(t, c, func(i int) string { return subjects.AuditSubject(subjects.VerbDeviceGroups) }, func(i int) []byte { return recs[i] }, n)

	out, _, err := fleetAdmin(t, c, "--json", "audit", "ls", "--since", "0")
	if err != nil {
		t.Fatal(err)
	}
	var got []model.AuditRecord
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatal(err)
	}
	if len(got) != n {
		t.Fatalf("audit ls: %d entries, want %d", len(got), n)
	}
	for i, r := range got[:n-1] {
		_, req, err := model.ParseEnvelope(r.Request)
		if err != nil || req.Nonce != fmt.Sprintf("n%d", i) {
			t.Fatalf("entry %d: %v %+v", i, err, req)
		}
	}
	out, _, err = fleetAdmin(t, c, "--json", "audit", "verify")
	if err != nil {
		t.Fatal(err)
	}
	var v struct {
		Entries int      `json:"entries"`
		Invalid []string `json:"invalid"`
		Refused int      `json:"refused_unsigned"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil || v.Entries != n || len(v.Invalid) != 0 || v.Refused != 1 {
		t.Fatalf("audit verify: %v %+v", err, v)
	}
}

// A rollout over 1,500 devices whose progress rows carry previous desired
// states with signed manifests: rollout show and watch list every row,
// without the manifests.
func TestRolloutViewPaged(t *testing.T) {
	c := startPaging(t)
	const n = 1500
	ids := deviceIDs(t, n)
	kp, _ := nkeys.CreateUser()
	prev := model.Release{ID: "rel-old", Name: "rel-old", CreatedAt: time.Now().UTC(), Action: model.ActionSwitch,
		Default: storePath("gen0"), Description: strings.Repeat("d", 2000)}
	signed, err := model.Sign(kp, model.PurposeRelease, prev)
	if err != nil {
		t.Fatal(err)
	}
	ro := model.Rollout{ID: "ro-big", ReleaseID: "rel-new", CreatedAt: time.Now().UTC(), UpdatedAt: time.Now().UTC(),
		Strategy: model.StrategyAll, BatchSizes: []int{n}, State: model.RolloutFailed, Reason: "too many failures",
		Total: n, Counts: map[model.DeviceRolloutState]int{model.DeviceSucceeded: n - 15, model.DeviceFailed: 10, model.DeviceTimedOut: 5}}
	putJSON(t, c, subjects.BucketRollouts, ro.ID, ro)
	bulkPublish(t, c, func(i int) string { return subjects.KVKey(subjects.BucketRollouts, deviceKey(ro.ID, ids[i])) }, func(i int) []byte {
		d := model.RolloutDevice{Device: ids[i], Name: fmt.Sprintf("host%05d", i), State: model.DeviceSucceeded, StorePath: storePath("gen1"),
			Previous: stored(model.Desired{Device: ids[i], ReleaseID: prev.ID, StorePath: storePath("gen0"), Release: signed})}
		switch {
		case i < 10:
			d.State, d.Error = model.DeviceFailed, "switch failed"
		case i < 15:
			d.State = model.DeviceTimedOut
		}
		b, _ := json.Marshal(d)
		return b
	}, n)

	out, _, err := fleetAdmin(t, c, "--json", "rollout", "show", ro.ID)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, `"previous"`) || strings.Contains(out, `"release":`) {
		t.Fatal("rollout show carries the previous signed manifests")
	}
	var v model.RolloutView
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatal(err)
	}
	if len(v.Progress) != n || v.Next != "" || v.Total != n {
		t.Fatalf("rollout show: %d rows, next %q, total %d", len(v.Progress), v.Next, v.Total)
	}
	seen := map[string]bool{}
	for _, p := range v.Progress {
		if seen[p.Device] || p.PreviousRelease != prev.ID || p.PreviousStorePath != storePath("gen0") {
			t.Fatalf("row %+v repeated or without its previous release", p)
		}
		seen[p.Device] = true
	}

	// watch (and deploy --wait) poll the summary, then list the failures.
	out, errs, err := fleetAdmin(t, c, "rollout", "watch", ro.ID)
	if err == nil || !strings.Contains(errs, "rollout ro-big failed") || strings.Count(errs, "host000") != 15 {
		t.Fatalf("rollout watch: %v\nstdout %s\nstderr %s", err, out, errs)
	}
	out, _, err = fleetAdmin(t, c, "--json", "rollout", "watch", ro.ID)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var last model.RolloutView
	if err == nil || json.Unmarshal([]byte(lines[len(lines)-1]), &last) != nil || len(last.Progress) != n {
		t.Fatalf("rollout watch --json: %v, %d lines, last with %d rows", err, len(lines), len(last.Progress))
	}
}

// A reply too large for a message is answered with an error at once, not
// left to the client's timeout.
func TestReplyTooLarge(t *testing.T) {
	c := startPaging(t)
	cl, err := admin.Dial(context.Background(), c.ClientURL(), filepath.Join(c.Config().DataDir, accounts.AdminCredsFile))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var out string
	err = cl.Call(ctx, "test-huge", false, nil, &out)
	var ae *admin.APIError
	if !errors.As(err, &ae) || ae.Code != model.CodeInternal || !strings.Contains(ae.Msg, "reply too large") || !strings.Contains(ae.Msg, "--limit") {
		t.Fatalf("want an internal error naming the size, got %v", err)
	}
	// The API still answers.
	if _, err := cl.Devices(ctx, ""); err != nil {
		t.Fatal(err)
	}
}

// stored is v as a bucket holds it.
func stored(v any) json.RawMessage {
	b, _ := json.Marshal(v)
	return b
}
