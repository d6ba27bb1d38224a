package agent

import (
	"testing"

	"github.com/nats-io/nats.go"
)

func TestDeviceInboxRoutesBySubject(t *testing.T) {
	var b deviceInbox
	got := map[string]int{}
	stopA := b.handle("_INBOX_DEV.s.d.desired", func(*nats.Msg) { got["desired"]++ })
	b.handle("_INBOX_DEV.s.d.cmd", func(*nats.Msg) { got["cmd"]++ })
	for _, subj := range []string{"_INBOX_DEV.s.d.desired", "_INBOX_DEV.s.d.cmd", "_INBOX_DEV.s.d.other", "_INBOX_DEV.s.d.desired"} {
		b.dispatch(&nats.Msg{Subject: subj})
	}
	stopA()
	b.dispatch(&nats.Msg{Subject: "_INBOX_DEV.s.d.desired"})
	if got["desired"] != 2 || got["cmd"] != 1 || len(got) != 2 {
		t.Errorf("handled %v, want desired 2 (none after stop), cmd 1, nothing else", got)
	}
}
