package integration

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"fleet/internal/poll"
	"fleet/model"
)

// jsonOut runs fleet-admin --json args and decodes its output into v.
func (w *fleetWorld) jsonOut(v any, args ...string) {
	w.t.Helper()
	out := w.mustAdmin(append([]string{"--json"}, args...)...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		w.t.Fatalf("fleet-admin --json %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// enrolOne enrols one more agent into group with a token of its own.
func (w *fleetWorld) enrolOne(name, group, initial string) *fleetDevice {
	w.t.Helper()
	token := strings.TrimSpace(w.mustAdmin("token", "create", "--group", group, "--uses", "1", "--ttl", "1h"))
	d, _ := w.startDevice(name, token, "nats://"+w.listen, initial)
	w.devices = append(w.devices, d)
	return d
}

func (w *fleetWorld) group(name string) model.GroupRow {
	w.t.Helper()
	var rows []model.GroupRow
	w.jsonOut(&rows, "groups", "ls")
	for _, r := range rows {
		if r.Group == name {
			return r
		}
	}
	return model.GroupRow{Group: name}
}

func (w *fleetWorld) rolloutCount() int {
	w.t.Helper()
	var rs []model.Rollout
	w.jsonOut(&rs, "rollout", "ls")
	return len(rs)
}

// TestGroupsHoldTargetWithBinaries: with the real coordinator and
// fleet-admin binaries and real agent loops, a group keeps the release of
// its last rollout: a device enrolled later converges to it, a device
// moved between groups moves, a device in two groups with two targets
// gets nothing until pinned; a deploy that changes nothing makes no
// rollout; a dry run changes nothing; abort --revert and undo return the
// devices.
func TestGroupsHoldTargetWithBinaries(t *testing.T) {
	w := newFleetWorld(t)
	gen0, gen1, gen2, gen3 := fakePath("gen0"), fakePath("gen1"), fakePath("gen2"), fakePath("gen3")
	w.addDevices(2, "developers", gen0)
	dev0, dev1 := w.devices[0], w.devices[1]
	w.release("rel-1", gen1)
	w.release("rel-2", gen2)
	w.release("rel-3", gen3)
	if _, errs, err := w.deployWait("--release", "rel-1", "--group", "developers", "--strategy", "all"); err != nil {
		t.Fatalf("rel-1: %v %s", err, errs)
	}
	poll.Telling(t, 30*time.Second, "developers' target rel-1", func() (bool, string) {
		g := w.group("developers")
		return g.ReleaseID == "rel-1" && g.OnTarget == 2, mustJSON(g)
	})

	// Enrolled after the rollout: it converges, no deploy needed.
	late := w.enrolOne("late", "developers", gen0)
	poll.Until(t, 30*time.Second, "the late device on rel-1", func() bool { return w.onSystem(gen1, late) })
	if n := late.act.switchCount(gen1); n != 1 {
		t.Fatalf("the late device switched to gen1 %d times", n)
	}

	// Deploying what every device runs changes nothing and makes no rollout.
	before := w.rolloutCount()
	out, errs, err := w.admin("deploy", "--release", "rel-1", "--group", "developers", "--strategy", "all")
	if err != nil || out != "" || !strings.Contains(errs, "nothing to do: 3 devices already run rel-1") {
		t.Fatalf("a deploy that changes nothing: %v %q %q", err, out, errs)
	}
	if got := w.rolloutCount(); got != before {
		t.Fatalf("a deploy that changed nothing made a rollout (%d → %d)", before, got)
	}

	// A dry run shows the devices and writes nothing.
	var pv model.DeployPreview
	w.jsonOut(&pv, "deploy", "--dry-run", "--release", "rel-2", "--group", "developers", "--batches", "1,100%")
	if len(pv.Devices) != 3 || fmt.Sprint(pv.BatchSizes) != "[1 2]" || pv.Devices[0].Current != gen1 || pv.Devices[0].New != gen2 || !pv.Devices[0].Online {
		t.Fatalf("dry run: %+v", pv)
	}
	if got := w.rolloutCount(); got != before || !w.onSystem(gen1, w.devices...) {
		t.Fatalf("a dry run changed something (rollouts %d → %d)", before, got)
	}
	if _, errs, err := w.admin("deploy", "--release", "rel-2", "--group", "developers", "--batches", "50%,1"); err == nil || !strings.Contains(errs, "cumulative") {
		t.Fatalf("shrinking batches: %v %s", err, errs)
	}

	// Moved into a group with another target, a device moves there.
	lab0 := w.enrolOne("lab0", "lab", gen0)
	if _, errs, err := w.deployWait("--release", "rel-2", "--group", "lab", "--strategy", "all"); err != nil {
		t.Fatalf("rel-2 to lab: %v %s", err, errs)
	}
	w.mustAdmin("devices", "set-groups", dev0.name, "lab")
	poll.Until(t, 30*time.Second, dev0.name+" moved to lab's rel-2", func() bool { return w.onSystem(gen2, dev0, lab0) })

	// In two groups with two targets: a conflict, and nothing is applied.
	w.mustAdmin("devices", "set-groups", dev1.name, "developers,lab")
	// A move made after it shows the sweep has passed the conflict.
	w.mustAdmin("devices", "set-groups", late.name, "lab")
	poll.Until(t, 30*time.Second, "the witness moved to rel-2", func() bool { return w.onSystem(gen2, late) })
	if !w.onSystem(gen1, dev1) || dev1.act.switchCount(gen2) != 0 {
		t.Fatal("a device in two groups with two targets was switched")
	}
	var st model.StatusReport
	w.jsonOut(&st, "status")
	i := slices.IndexFunc(st.Devices, func(r model.DeviceStatusRow) bool { return r.ID == dev1.id })
	if i < 0 || !strings.Contains(st.Devices[i].Conflict, "lab→rel-2") {
		t.Fatalf("status does not name the conflict: %+v", st.Devices)
	}
	if g := w.group("lab"); g.Conflicts != 1 {
		t.Fatalf("groups ls lab: %+v", g)
	}
	// A pin settles it.
	w.mustAdmin("devices", "pin", dev1.name, "--release", "rel-2")
	poll.Until(t, 30*time.Second, "the pinned device on rel-2", func() bool { return w.onSystem(gen2, dev1) })

	// rel-3 to lab, then undone: every device returns to rel-2.
	ro, errs, err := w.deployWait("--release", "rel-3", "--group", "lab", "--strategy", "all")
	if err != nil {
		t.Fatalf("rel-3 to lab: %v %s", err, errs)
	}
	if !w.onSystem(gen3, dev0, lab0, late) || !w.onSystem(gen2, dev1) {
		t.Fatal("rel-3: the lab devices are not on gen3, or the pinned one moved")
	}
	var undone model.RolloutView
	w.jsonOut(&undone, "rollout", "undo", ro.ID)
	if undone.State != model.RolloutReverted || undone.Counts[model.DeviceReverted] != 3 {
		t.Fatalf("undo: %+v", undone.Rollout)
	}
	poll.Until(t, 30*time.Second, "lab back on rel-2", func() bool { return w.onSystem(gen2, dev0, lab0, late) })
	poll.Telling(t, 30*time.Second, "lab's target back to rel-2", func() (bool, string) {
		g := w.group("lab")
		return g.ReleaseID == "rel-2", mustJSON(g)
	})

	// abort --revert of a paused rollout: the device that took it returns.
	lab0.bad.Store(&gen3)
	ro, _, err = w.deployWait("--release", "rel-3", "--group", "lab", "--batches", "1,100%", "--max-failures", "0")
	if err == nil || ro.State != model.RolloutPaused {
		t.Fatalf("want paused: %v %+v", err, ro.Rollout)
	}
	w.jsonOut(&undone, "rollout", "abort", "--revert", ro.ID)
	if undone.State != model.RolloutReverted {
		t.Fatalf("abort --revert: %+v", undone.Rollout)
	}
	poll.Until(t, 30*time.Second, "lab on rel-2 after abort --revert", func() bool { return w.onSystem(gen2, dev0, lab0, late) })
}
