package integration

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"fleet/agent"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/nixtest"
)

// sandbox adds a Nix sandbox on a base system for one more device, not
// enrolled yet: its systems are built in it (a system's switch script
// names its sandbox).
func (w *cacheWorld) sandbox(host string) int {
	w.t.Helper()
	env, err := nixtest.New(w.ctx, w.t.TempDir())
	if err != nil {
		w.t.Fatal(err)
	}
	if err := env.Close(); err != nil { // over NATS only
		w.t.Fatal(err)
	}
	base, err := env.Build(w.ctx, "base-"+host, nixtest.BuildOpts{})
	if err != nil {
		w.t.Fatal(err)
	}
	if err := env.Install(w.ctx, base); err != nil {
		w.t.Fatal(err)
	}
	w.envs = append(w.envs, env)
	w.hosts = append(w.hosts, host)
	return len(w.envs) - 1
}

// enrol enrols sandbox i's device through a real token of group and runs
// the fleet-agent binary for it.
func (w *cacheWorld) enrol(i int, group string) {
	w.t.Helper()
	token := strings.TrimSpace(w.mustAdmin("token", "create", "--group", group, "--uses", "1", "--ttl", "1h"))
	cr, err := agent.LoadOrEnroll(w.ctx, agent.EnrollOptions{Servers: []string{"nats://" + w.coord.ClientAddr()},
		StateDir: w.t.TempDir(), Token: token, Hostname: w.hosts[i], Log: zerolog.Nop()})
	if err != nil {
		w.t.Fatal(err)
	}
	w.ids = append(w.ids, cr.PublicKey())
	w.startAgent(w.envs[i], w.hosts[i], cr)
}

// TestGroupTargetConvergesWithNix: with real Nix and the fleet-agent
// binary, a device enrolled into a group after the group's rollout
// fetches and switches to the group's release without a new deploy.
func TestGroupTargetConvergesWithNix(t *testing.T) {
	w := newCacheWorld(t, "grp-a")
	late := w.sandbox("grp-late")
	sysA, sysLate := w.build(0, "sys-grp-a"), w.build(late, "sys-grp-late")
	if _, errs, err := w.admin("release", "create", "--name", "rel-grp", "--push",
		"--closure", "grp-a="+sysA.Path, "--closure", "grp-late="+sysLate.Path); err != nil {
		t.Fatalf("release create: %v\n%s", err, errs)
	}
	for i, s := range []nixtest.System{sysA, sysLate} { // only the fleet cache has them
		if err := w.envs[[]int{0, late}[i]].Delete(w.ctx, s.Path); err != nil {
			t.Fatal(err)
		}
	}
	if out, errs, err := w.admin("deploy", "--release", "rel-grp", "--group", "cache", "--strategy", "all", "--wait"); err != nil {
		t.Fatalf("deploy --wait: %v\n%s\n%s", err, out, errs)
	}
	poll.Telling(t, 30*time.Second, "the group's target", func() (bool, string) {
		var v model.GroupView
		out := w.mustAdmin("--json", "groups", "show", "cache")
		_ = json.Unmarshal([]byte(out), &v)
		return v.ReleaseID == "rel-grp", out
	})

	w.enrol(late, "cache")
	poll.Until(t, 2*time.Minute, "the late device switched to the group's release", func() bool {
		return w.switched(late, sysLate) && nixtest.Readlink(w.envs[late].CurrentSystem) == sysLate.Path
	})
	var ros []model.Rollout
	if err := json.Unmarshal([]byte(w.mustAdmin("--json", "rollout", "ls")), &ros); err != nil {
		t.Fatal(err)
	}
	converged := 0
	for _, r := range ros {
		if r.Kind == model.KindConverge && r.ReleaseID == "rel-grp" && r.Group == "cache" {
			converged++
			if r.Total != 1 {
				t.Fatalf("convergence rollout of %d devices: %+v", r.Total, r)
			}
		}
	}
	if converged != 1 {
		t.Fatalf("%d convergence rollouts, want 1: %+v", converged, ros)
	}
	poll.Telling(t, 30*time.Second, "both devices on target", func() (bool, string) {
		var v model.GroupView
		out := w.mustAdmin("--json", "groups", "show", "cache")
		_ = json.Unmarshal([]byte(out), &v)
		return v.Devices == 2 && v.OnTarget == 2, out
	})
}
