package nixtest

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestPublishFetchSwitch(t *testing.T) {
	ctx, e, good := installed(t)
	other, err := e.Build(ctx, "other", BuildOpts{})
	if err != nil {
		t.Fatal(err)
	}
	bad, err := e.NewKey(ctx, "untrusted")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Publish(ctx, other, bad); err != nil {
		t.Fatal(err)
	}
	if e.Valid(ctx, other.Path) {
		t.Fatal("published path still in the store")
	}
	cmd := exec.CommandContext(ctx, "nix", "copy", "--from", e.Substituter, other.Path)
	cmd.Env = e.Environ()
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "lacks a valid signature") {
		t.Fatalf("untrusted copy: err %v, output %s", err, out)
	}
	cmd = exec.CommandContext(ctx, good.Path+"/bin/switch-to-configuration", "test")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("switch: %v %s", err, out)
	}
	if got := Readlink(e.CurrentSystem); got != good.Path {
		t.Fatalf("current %q want %q", got, good.Path)
	}
	if l := e.Switches(); len(l) != 1 || l[0] != "test "+good.Path {
		t.Fatalf("log %q", l)
	}
}

// A FailSwitch system's switch-to-configuration fails and changes nothing.
func TestFailSwitch(t *testing.T) {
	ctx, e, good := installed(t)
	broken, err := e.Build(ctx, "broken", BuildOpts{FailSwitch: true})
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctx, broken.Path+"/bin/switch-to-configuration", "boot").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "cannot boot") {
		t.Fatalf("broken switch: err %v, output %s", err, out)
	}
	if got := Readlink(e.CurrentSystem); got != good.Path {
		t.Fatalf("current %q want %q", got, good.Path)
	}
	if l := e.Switches(); len(l) != 1 || l[0] != "fail boot "+broken.Path {
		t.Fatalf("log %q", l)
	}
}

// installed is an Env with a system "good" built and installed as the
// running one.
func installed(t *testing.T) (context.Context, *Env, System) {
	t.Helper()
	Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	e, err := New(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	good, err := e.Build(ctx, "good", BuildOpts{})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Install(ctx, good); err != nil {
		t.Fatal(err)
	}
	return ctx, e, good
}
