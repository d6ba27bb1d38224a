package admin_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"fleet/admin"
	"fleet/model"
)

func storePath(name string) string {
	return "/nix/store/" + strings.Repeat("a", 31) + "b-" + name
}

// Releases: create from store paths, list, show, diff; immutable and
// validated.
func TestReleaseCommands(t *testing.T) {
	c := start(t)
	out, errs, code := run(t, c, "release", "create", "--name", "rel-1", "--closure", "web1="+storePath("web1-a"), "--default", storePath("base"), "--description", "first")
	if code != 0 || strings.TrimSpace(out) != "rel-1" {
		t.Fatalf("release create: %d %q %s", code, out, errs)
	}
	_, errs, code = run(t, c, "release", "create", "--name", "rel-2", "--closure", "web1="+storePath("web1-b"), "--closure", "db="+storePath("db"))
	if code != 0 {
		t.Fatalf("release create rel-2: %s", errs)
	}
	// Immutable: the same id again is refused and rel-1 is unchanged.
	_, errs, code = run(t, c, "release", "create", "--name", "rel-1", "--default", storePath("other"))
	if code == 0 || !strings.Contains(errs, "already exists") {
		t.Fatalf("duplicate release: %d %s", code, errs)
	}
	out, _, _ = run(t, c, "--json", "release", "show", "rel-1")
	var v model.ReleaseView
	if err := json.Unmarshal([]byte(out), &v); err != nil || v.Default != storePath("base") || v.Closures["web1"] != storePath("web1-a") {
		t.Fatalf("release show: %v %s", err, out)
	}
	// The stored manifest is signed by the owner who created it.
	if _, err := model.VerifyRelease(&v.Signed, []string{v.Author}); err != nil {
		t.Fatalf("stored manifest: %v", err)
	}
	out, _, _ = run(t, c, "--json", "release", "ls")
	var rels []model.Release
	if err := json.Unmarshal([]byte(out), &rels); err != nil || len(rels) != 2 {
		t.Fatalf("release ls: %v %s", err, out)
	}
	out, errs, code = run(t, c, "release", "diff", "rel-1", "rel-2")
	if code != 0 || !strings.Contains(out, "+ db") || !strings.Contains(out, "~ web1") || !strings.Contains(out, "~ (default)") {
		t.Fatalf("release diff: %s %s", out, errs)
	}

	for _, bad := range [][]string{
		{"release", "create", "--name", "bad1", "--default", "/tmp/evil"},
		{"release", "create", "--name", "bad2", "--closure", "web1"},
		{"release", "create", "--name", "bad 3", "--default", storePath("x")},
		{"release", "create", "--name", "bad4"},
		{"release", "create", "--name", "bad5", "--closure", "bad_host!=" + storePath("x")},
		{"release", "create", "--name", "bad6", "--default", storePath("x"), "--substituter", "not a url"},
	} {
		_, errs, code := run(t, c, bad...)
		if code == 0 {
			t.Errorf("%v accepted", bad)
		} else if errs == "" {
			t.Errorf("%v: no error message", bad)
		}
	}
	out, _, _ = run(t, c, "--json", "release", "ls")
	if err := json.Unmarshal([]byte(out), &rels); err != nil || len(rels) != 2 {
		t.Fatalf("bad releases left something behind: %s", out)
	}
	// A release JSON file works too.
	file := filepath.Join(t.TempDir(), "rel.json")
	os.WriteFile(file, []byte(`{"closures": {"web9": "`+storePath("web9")+`"}, "action": "boot"}`), 0o644)
	out, errs, code = run(t, c, "--json", "release", "create", "--name", "rel-3", "--file", file)
	if code != 0 || !strings.Contains(out, `"action": "boot"`) {
		t.Fatalf("release from file: %s %s", out, errs)
	}
	// A misspelt key, or an id that disagrees with --name, is refused.
	bad := filepath.Join(t.TempDir(), "bad.json")
	os.WriteFile(bad, []byte(`{"default": "`+storePath("x")+`", "substitutor": "https://cache"}`), 0o644)
	if _, errs, code := run(t, c, "release", "create", "--name", "rel-4", "--file", bad); code == 0 || !strings.Contains(errs, "substitutor") {
		t.Fatalf("misspelt key: %d %s", code, errs)
	}
	os.WriteFile(bad, []byte(`{"id": "rel-5", "default": "`+storePath("x")+`"}`), 0o644)
	if _, errs, code := run(t, c, "release", "create", "--name", "rel-6", "--file", bad); code == 0 || !strings.Contains(errs, "give one") {
		t.Fatalf("id and --name disagree: %d %s", code, errs)
	}
}

// Roles: a viewer reads but cannot deploy; an operator of group qa cannot
// deploy to developers; every refusal is in the audit, and audit verify
// checks every entry's signature.
func TestRolesAndAudit(t *testing.T) {
	c := start(t)
	if _, errs, code := run(t, c, "release", "create", "--name", "rel-1", "--default", storePath("base")); code != 0 {
		t.Fatal(errs)
	}
	dir := t.TempDir()
	viewer, qa := filepath.Join(dir, "viewer.creds"), filepath.Join(dir, "qa.creds")
	if _, errs, code := run(t, c, "admin", "add", "vera", "--role", "viewer", "--out", viewer); code != 0 {
		t.Fatal(errs)
	}
	if _, errs, code := run(t, c, "admin", "add", "quinn", "--role", "operator", "--group", "qa", "--out", qa); code != 0 {
		t.Fatal(errs)
	}
	if fi, err := os.Stat(viewer); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("viewer creds: %v %v", err, fi)
	}
	// --out never overwrites.
	if _, errs, code := run(t, c, "admin", "add", "other", "--role", "viewer", "--out", viewer); code == 0 || !strings.Contains(errs, "exists already") {
		t.Fatalf("admin add over existing file: %s", errs)
	}
	as := func(creds string, args ...string) (string, string, int) {
		return run(t, c, append([]string{"--creds", creds}, args...)...)
	}
	if out, errs, code := as(viewer, "release", "ls"); code != 0 || !strings.Contains(out, "rel-1") {
		t.Fatalf("viewer release ls: %s %s", out, errs)
	}
	if _, errs, code := as(viewer, "deploy", "--release", "rel-1", "--group", "developers"); code == 0 || !strings.Contains(errs, "may not call") {
		t.Fatalf("viewer deploy: %d %s", code, errs)
	}
	if _, errs, code := as(qa, "deploy", "--release", "rel-1", "--group", "developers"); code == 0 || !strings.Contains(errs, "only qa") {
		t.Fatalf("qa operator deploy to developers: %d %s", code, errs)
	}
	// In its own group the operator gets past the role check (the group is empty).
	if _, errs, code := as(qa, "deploy", "--release", "rel-1", "--group", "qa"); code == 0 || !strings.Contains(errs, "no active devices") {
		t.Fatalf("qa operator deploy to qa: %d %s", code, errs)
	}
	for _, bad := range []string{"0", "150%", "x"} {
		if _, errs, code := run(t, c, "deploy", "--release", "rel-1", "--group", "qa", "--batches", bad); code == 0 || errs == "" {
			t.Errorf("--batches %s accepted", bad)
		}
	}
	if _, errs, code := run(t, c, "rollout", "resume", "r20260101-000000-aaaaaaaa"); code == 0 || !strings.Contains(errs, "does not exist") {
		t.Fatalf("resume unknown rollout: %s", errs)
	}

	out, errs, code := run(t, c, "--json", "audit", "ls")
	if code != 0 {
		t.Fatal(errs)
	}
	var recs []model.AuditRecord
	if err := json.Unmarshal([]byte(out), &recs); err != nil {
		t.Fatal(err)
	}
	refusedDeploys := map[string]bool{}
	for _, r := range recs {
		if r.Verb == "deploy" && r.Result == model.AuditRefused {
			refusedDeploys[r.Admin] = true
		}
	}
	if !refusedDeploys["vera"] || !refusedDeploys["quinn"] {
		t.Fatalf("refused deploys not all audited: %+v", refusedDeploys)
	}
	out, errs, code = run(t, c, "audit", "verify")
	if code != 0 || !strings.Contains(out, "0 accepted entries with a bad signature") {
		t.Fatalf("audit verify: %d %s %s", code, out, errs)
	}
	// An observer (a dashboard) reads the fleet's state and nothing else.
	obs := filepath.Join(dir, "obs.creds")
	if _, errs, code := run(t, c, "admin", "add", "grafana", "--role", "observer", "--out", obs); code != 0 {
		t.Fatal(errs)
	}
	if out, errs, code := as(obs, "--json", "status"); code != 0 || !strings.Contains(out, `"summary"`) {
		t.Fatalf("observer status: %s %s", out, errs)
	}
	if _, errs, code := as(obs, "release", "ls"); code != admin.ExitDenied || !strings.Contains(errs, "may not call") {
		t.Fatalf("observer release ls: %d %s", code, errs)
	}
	// Removing an admin revokes its creds at once.
	if _, errs, code := run(t, c, "--yes", "admin", "remove", "vera"); code != 0 {
		t.Fatal(errs)
	}
	// Its creds are refused at connect: not authorised, said so.
	if _, errs, code := as(viewer, "release", "ls"); code != admin.ExitDenied || !strings.Contains(errs, "refused the credentials") {
		t.Fatalf("removed admin: exit %d, %s", code, errs)
	}
	if _, errs, code := run(t, c, "--yes", "admin", "remove", "owner"); code == 0 || !strings.Contains(errs, "last owner") {
		t.Fatalf("removing the last owner: %s", errs)
	}
}
