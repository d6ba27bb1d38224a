package natsdial

import (
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

func connect(t *testing.T, url string, opts ...nats.Option) (*Error, time.Duration) {
	t.Helper()
	d := &Dialer{}
	start := time.Now()
	nc, err := nats.Connect(url, append(opts, d.Option(), nats.Timeout(10*time.Second))...)
	took := time.Since(start)
	if err == nil {
		nc.Close()
		t.Fatalf("connected to %s", url)
	}
	return d.Explain(err, url, "check --server"), took
}

func closedPort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// Each failure has its own message, within two seconds.
func TestKinds(t *testing.T) {
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok")) }))
	defer web.Close()
	// A server that greets with something else (SSH, SMTP...).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("SSH-2.0-OpenSSH_9.2\r\n"))
			defer c.Close()
		}
	}()
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, Username: "u", Password: "right", NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	defer ns.Shutdown()
	if !ns.ReadyForConnections(5 * time.Second) {
		t.Fatal("nats-server not ready")
	}

	cases := []struct {
		name string
		url  string
		opts []nats.Option
		kind Kind
		says string
	}{
		{"closed port", "nats://" + closedPort(t), nil, Refused, "nothing listens"},
		{"HTTP port", strings.Replace(web.URL, "http://", "nats://", 1), nil, NotNATS, "does not speak NATS"},
		{"other protocol", "nats://" + ln.Addr().String(), nil, NotNATS, "does not speak NATS"},
		{"bad creds", ns.ClientURL(), []nats.Option{nats.UserInfo("u", "wrong")}, Auth, "refused the credentials"},
		{"no such host", "nats://no-such-host.invalid:4222", nil, NoHost, "cannot resolve"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e, took := connect(t, c.url, c.opts...)
			if e.Kind != c.kind || !strings.Contains(e.Error(), c.says) || !strings.Contains(e.Error(), "check --server") {
				t.Errorf("%s: kind %d, %q", c.url, e.Kind, e)
			}
			if took > 2*time.Second {
				t.Errorf("%s: took %s", c.url, took)
			}
			if !errors.Is(e, e.Err) {
				t.Error("does not unwrap")
			}
		})
	}
	// The right creds still connect through the dialer, and the connection
	// keeps working past the greeting deadline.
	d := &Dialer{Greeting: 200 * time.Millisecond}
	nc, err := nats.Connect(ns.ClientURL(), nats.UserInfo("u", "right"), d.Option())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	sub, err := nc.SubscribeSync("x")
	if err != nil {
		t.Fatal(err)
	}
	// The message comes after the greeting deadline has passed: a deadline
	// left in place would have broken the connection by then.
	time.AfterFunc(2*d.Greeting, func() { nc.Publish("x", []byte("late")) })
	m, err := sub.NextMsg(5 * time.Second)
	if err != nil || string(m.Data) != "late" {
		t.Fatalf("after the greeting deadline: %v %v", m, err)
	}
}
