package model

import (
	"encoding/json"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/nats-io/nkeys"
)

func TestCleanText(t *testing.T) {
	for in, want := range map[string]string{
		"laptop-1":                       "laptop-1",
		"line one\nline\ttwo":            "line one\nline\ttwo",
		"\x1b[2J\x1b[31mred\x1b[0m":      "[2J[31mred[0m",
		"bell\a back\b cr\r nul\x00":     "bell back cr nul",
		"c1 \u009b31m":                   "c1 31m",
		"bad \xff utf8":                  "bad \uFFFD utf8",
		"ümlaut ✓":                       "ümlaut ✓",
		"\u202eRTL override is not C0/1": "\u202eRTL override is not C0/1",
	} {
		if got := CleanText(in); got != want {
			t.Errorf("CleanText(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzCleanText(f *testing.F) {
	f.Add("\x1b]0;title\x07text")
	f.Add("ok\n")
	f.Fuzz(func(t *testing.T, s string) {
		c := CleanText(s)
		if !utf8.ValidString(c) {
			t.Fatalf("invalid UTF-8 out of %q", s)
		}
		if strings.ContainsFunc(c, func(r rune) bool { return r != '\n' && r != '\t' && unicode.IsControl(r) }) {
			t.Fatalf("control character left in %q", c)
		}
		if CleanText(c) != c {
			t.Fatalf("not idempotent on %q", s)
		}
	})
}

func TestCheckSubstituter(t *testing.T) {
	for _, ok := range []string{"https://cache.example.org", "http://127.0.0.1:8080", "file:///srv/cache", "s3://bucket?region=eu-west-1", "https://cache.nixos.org/"} {
		if err := CheckSubstituter(ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "ssh://-oProxyCommand=touch /tmp/pwned", "ssh://cache.example.org", "ssh-ng://host", "-oProxyCommand=x",
		"http://-oProxyCommand=x", "file://host/path", "file://", "cache.example.org", "https://", "https://a b", "https://a\nb",
		"daemon", "local?root=/tmp", "mailto:x@example.org", "https:cache"} {
		if err := CheckSubstituter(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// A device's report has what a terminal would act on stripped before
// anything stores it.
func TestReportsAreCleaned(t *testing.T) {
	kp := newTestUser(t)
	pub, _ := kp.PublicKey()
	s, err := Sign(kp, PurposeFacts, Facts{Device: pub, Hostname: "x\x1b[2Jy", Kernel: "6.1\x1b]0;pwned\x07", Mounts: []Mount{{Path: "/\x1b[31m"}}})
	if err != nil {
		t.Fatal(err)
	}
	b := mustJSON(t, s)
	f, err := ParseFacts(b, pub)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{f.Hostname, f.Kernel, f.Mounts[0].Path} {
		if strings.ContainsRune(v, 0x1b) || strings.ContainsRune(v, 0x07) {
			t.Errorf("escape left in %q", v)
		}
	}
}

func newTestUser(t *testing.T) nkeys.KeyPair {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
