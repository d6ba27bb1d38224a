package bench

import (
	"bytes"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// The scanner hands on exactly the watched subject's payloads, however
// the stream is cut into reads.
func TestProtoScannerSplits(t *testing.T) {
	stream := "INFO {\"server_id\":\"x\"}\r\n" +
		"MSG other 1 5\r\nhello\r\n" +
		"PING\r\n+OK\r\n" +
		"MSG watch.me 2 _INBOX.x 3\r\nabc\r\n" +
		"HMSG watch.me 2 12 14\r\nNATS/1.0\r\n\r\nhi\r\n" +
		"MSG watch.me.not 3 4\r\nMSG \r\n" +
		"HMSG other 4 12 12\r\nNATS/1.0\r\n\r\n\r\n" +
		"MSG watch.me 2 0\r\n\r\n" +
		"-ERR 'x'\r\nPONG\r\n"
	want := []string{"abc", "hi", ""}
	for cut := 1; cut <= len(stream); cut++ {
		var got []string
		s := protoScanner{subject: []byte("watch.me"), onMsg: func(_ time.Time, p []byte) { got = append(got, string(p)) }}
		for b := []byte(stream); len(b) > 0; {
			n := min(cut, len(b))
			s.scan(b[:n], time.Now())
			b = b[n:]
		}
		if fmt.Sprint(got) != fmt.Sprint(want) || s.lost {
			t.Fatalf("reads of %d bytes: got %q (lost %v), want %q", cut, got, s.lost, want)
		}
	}
}

// A stream it cannot follow stops the scanner, not the connection.
func TestProtoScannerGivesUp(t *testing.T) {
	for _, stream := range []string{"MSG watch.me 1 x\r\nabc\r\n", "HMSG watch.me 1 9 3\r\nabc\r\n", "MSG a b c d e f\r\n"} {
		called := false
		s := protoScanner{subject: []byte("watch.me"), onMsg: func(time.Time, []byte) { called = true }}
		s.scan([]byte(stream+"MSG watch.me 1 1\r\nz\r\n"), time.Now())
		if !s.lost || called {
			t.Fatalf("%q: lost %v, called %v", stream, s.lost, called)
		}
	}
}

// Through a real server: each message on the watched subject is handed
// on once, with the kernel's receive time (between its publish and its
// delivery to the subscriber), and the connection works as before.
func TestStampedConnection(t *testing.T) {
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoSigs: true, NoLog: true})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	defer ns.Shutdown()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("server did not start")
	}
	type stamped struct {
		at      time.Time
		payload string
	}
	var mu sync.Mutex
	var seen []stamped
	nc, err := nats.Connect(ns.ClientURL(), nats.SetCustomDialer(stampDialer{subject: "watch.me", onMsg: func(at time.Time, p []byte) {
		mu.Lock()
		seen = append(seen, stamped{at, string(p)})
		mu.Unlock()
	}}))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	got := make(chan time.Time, 10)
	if _, err := nc.Subscribe("watch.me", func(*nats.Msg) { got <- time.Now() }); err != nil {
		t.Fatal(err)
	}
	if _, err := nc.Subscribe("other", func(*nats.Msg) {}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil { // the server has both subscriptions
		t.Fatal(err)
	}
	pub, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	big := bytes.Repeat([]byte("x"), 200<<10) // many reads
	var sent []time.Time
	var delivered []time.Time
	for i, p := range [][]byte{[]byte("one"), big, []byte("three")} {
		_ = pub.Publish("other", big)
		sent = append(sent, time.Now())
		m := nats.NewMsg("watch.me")
		m.Data = p
		if i == 1 {
			m.Header.Set("K", "v")
		}
		if err := pub.PublishMsg(m); err != nil {
			t.Fatal(err)
		}
		select {
		case at := <-got:
			delivered = append(delivered, at)
		case <-time.After(10 * time.Second):
			t.Fatalf("message %d not delivered", i)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 3 || seen[0].payload != "one" || seen[1].payload != string(big) || seen[2].payload != "three" {
		t.Fatalf("handed on %d messages: %v", len(seen), seen)
	}
	for i, s := range seen {
		if s.at.Before(sent[i]) || s.at.After(delivered[i]) {
			t.Errorf("message %d stamped %v, published %v, delivered %v", i, s.at, sent[i], delivered[i])
		}
	}
}
