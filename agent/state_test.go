package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
)

// Damaged files say what to do about them.
func TestDamagedFilesSayWhatToDo(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, StateFile), []byte("{garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadState(dir); err == nil || !strings.Contains(err.Error(), "remove it") || !strings.Contains(err.Error(), StateFile) {
		t.Fatalf("damaged state: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, CredsFile), []byte("not creds"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := LoadCreds(dir)
	if err == nil || IsNotEnrolled(err) || !strings.Contains(err.Error(), "enrol again") || !strings.Contains(err.Error(), CredsFile) {
		t.Fatalf("damaged creds: %v", err)
	}
}

// Event logs keep their last 8 KiB, cut on a character boundary.
func TestCapTail(t *testing.T) {
	long := strings.Repeat("é", MaxEventLog) + "END"
	got := capTail(long, MaxEventLog)
	if len(got) > MaxEventLog || !strings.HasSuffix(got, "END") || !utf8.ValidString(got) {
		t.Fatalf("capTail: %d bytes, valid %v", len(got), utf8.ValidString(got))
	}
	if capTail("short", MaxEventLog) != "short" {
		t.Fatal("short log changed")
	}
}

// Which send failures drop an outbox message instead of retrying it: the
// coordinator's permanent refusal and what the connection can never send.
func TestPermanentPublishError(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{nats.ErrMaxPayload, true},
		{fmt.Errorf("send x: %w", nats.ErrBadSubject), true},
		{fmt.Errorf("%w: event too large", errReportRefused), true},
		{nats.ErrNoResponders, false},
		{fmt.Errorf("send x: %w", nats.ErrTimeout), false},
		{context.DeadlineExceeded, false},
		{errors.New("send fleet.dev.x.events: stream unavailable"), false},
		{errors.New("connection closed"), false},
	} {
		if got := permanentPublishError(tc.err); got != tc.want {
			t.Errorf("%v: permanent %v, want %v", tc.err, got, tc.want)
		}
	}
}
