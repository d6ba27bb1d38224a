package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// The baseline: the same machine, a bare NATS server (no accounts, no
// JetStream), N connections each subscribed to its own subject. The
// driver publishes once per subject (the notify); each connection then
// asks a single responder, as a device reads its desired state from the
// coordinator (the get).

// RunRawServer runs a bare NATS server on addr until ctx ends.
func RunRawServer(ctx context.Context, host string, port int) error {
	ns, err := server.NewServer(&server.Options{Host: host, Port: port, NoSigs: true, MaxPayload: 1 << 20})
	if err != nil {
		return err
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		return fmt.Errorf("raw nats server did not start")
	}
	<-ctx.Done()
	ns.Shutdown()
	ns.WaitForShutdown()
	return nil
}

func rawNotify(i int) string { return "bench.n." + strconv.Itoa(i) }
func rawGet(i int) string    { return "bench.get." + strconv.Itoa(i) }

// RunRawSim is the baseline's simulator: Count connections, commands and
// answers as RunSim's.
func RunRawSim(ctx context.Context, in io.Reader, out io.Writer) error {
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	if !sc.Scan() {
		return fmt.Errorf("raw simulator: no config on stdin")
	}
	var cfg simConfig
	if err := json.Unmarshal(sc.Bytes(), &cfg); err != nil {
		return fmt.Errorf("raw simulator config: %w", err)
	}
	if err := renice(cfg.Nice); err != nil {
		return err
	}
	var mu sync.Mutex
	notified := make([]int64, cfg.Count)
	answered := make([]int64, cfg.Count)
	conns := make([]*nats.Conn, 0, cfg.Count)
	defer func() {
		for _, nc := range conns {
			nc.Close()
		}
	}()
	enc := json.NewEncoder(out)
	for sc.Scan() {
		var c simCmd
		if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
			return fmt.Errorf("raw simulator command: %w", err)
		}
		r := simReply{Op: c.Op}
		switch c.Op {
		case "start":
			for i := range cfg.Count {
				n := cfg.First + i
				stamp := stampDialer{subject: rawNotify(n), onMsg: func(at time.Time, _ []byte) {
					mu.Lock()
					if notified[i] == 0 {
						notified[i] = at.UnixNano()
					}
					mu.Unlock()
				}}
				nc, err := nats.Connect(cfg.Servers[0], nats.Name("raw-bench"), nats.MaxReconnects(-1), nats.SetCustomDialer(stamp))
				if err != nil {
					r.Error = err.Error()
					break
				}
				conns = append(conns, nc)
				_, err = nc.Subscribe(rawNotify(n), func(*nats.Msg) {
					if _, err := nc.Request(rawGet(n), nil, 30*time.Second); err != nil {
						return
					}
					t := time.Now().UnixNano()
					mu.Lock()
					answered[i] = t
					mu.Unlock()
				})
				if err == nil {
					err = nc.Flush()
				}
				if err != nil {
					r.Error = err.Error()
					break
				}
			}
		case "collect":
			mu.Lock()
			r.Received = append([]int64(nil), notified...)
			r.Answered = append([]int64(nil), answered...)
			mu.Unlock()
		case "stop":
			return enc.Encode(r)
		default:
			r.Error = "unknown command " + c.Op
		}
		if err := enc.Encode(r); err != nil {
			return err
		}
	}
	return sc.Err()
}

// responder is the baseline's other end: it publishes the notifies and
// answers every connection's request, on one subscription as the
// coordinator does.
type responder struct {
	nc *nats.Conn
}

func natsResponder(url string) (*responder, error) {
	nc, err := nats.Connect(url, nats.Name("raw-bench-responder"))
	if err != nil {
		return nil, err
	}
	if _, err := nc.Subscribe("bench.get.*", func(m *nats.Msg) { _ = m.Respond([]byte("ok")) }); err != nil {
		nc.Close()
		return nil, err
	}
	return &responder{nc: nc}, nc.Flush()
}

func (r *responder) notifyAll(n int) error {
	for i := range n {
		if err := r.nc.Publish(rawNotify(i), nil); err != nil {
			return err
		}
	}
	return r.nc.Flush()
}

func (r *responder) Close() { r.nc.Close() }
