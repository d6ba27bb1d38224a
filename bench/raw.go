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
	"github.com/nats-io/nats.go/jetstream"
)

// The baseline: the same machine, a bare NATS server (no accounts, no
// JetStream), N connections each subscribed to its own subject. The
// driver publishes once per subject (the notify); each connection then
// asks a single responder, as a device reads its desired state from the
// coordinator (the get).

// RunRawServer runs a bare NATS server on addr until ctx ends, with
// JetStream in store for the durable baseline (nothing else uses it).
func RunRawServer(ctx context.Context, host string, port int, store string) error {
	ns, err := server.NewServer(&server.Options{Host: host, Port: port, NoSigs: true, MaxPayload: 1 << 20, JetStream: true, StoreDir: store})
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
		case "reset":
			// The next round's receipts (the durable baseline's).
			mu.Lock()
			clear(notified)
			clear(answered)
			mu.Unlock()
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
	// tell sends the durable baseline's notifies while nc takes its
	// writes' acks, as the coordinator's engine tells devices on
	// connections of their own.
	tell *nats.Conn
}

func natsResponder(url string) (*responder, error) {
	nc, err := nats.Connect(url, nats.Name("raw-bench-responder"))
	if err != nil {
		return nil, err
	}
	tell, err := nats.Connect(url, nats.Name("raw-bench-tell"))
	if err != nil {
		nc.Close()
		return nil, err
	}
	r := &responder{nc: nc, tell: tell}
	if _, err := nc.Subscribe("bench.get.*", func(m *nats.Msg) { _ = m.Respond([]byte("ok")) }); err != nil {
		r.Close()
		return nil, err
	}
	return r, nc.Flush()
}

func (r *responder) notifyAll(n int) error {
	for i := range n {
		if err := r.nc.Publish(rawNotify(i), nil); err != nil {
			return err
		}
	}
	return r.nc.Flush()
}

// writeThenNotify is the durable baseline: what the least a deploy must do
// costs on a bare server. Each of n values is written to its own key of a
// KV bucket (file storage, one revision kept, as fleet_desired), at most
// rawWriteWindow writes in flight, and its subject is told (the value in
// the message) as soon as its write is acknowledged.
func (r *responder) writeThenNotify(ctx context.Context, n int, value []byte) error {
	js, err := jetstream.New(r.nc, jetstream.WithPublishAsyncMaxPending(rawWriteWindow))
	if err != nil {
		return err
	}
	if _, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "raw", History: 1, Storage: jetstream.FileStorage}); err != nil {
		return fmt.Errorf("raw bucket: %w", err)
	}
	// The channel's room is the window: the writer blocks when it is full.
	acks := make(chan jetstream.PubAckFuture, rawWriteWindow-1)
	told := make(chan error, 1)
	go func() {
		var first error
		i := 0
		for f := range acks {
			select {
			case <-f.Ok():
				if err := r.tell.Publish(rawNotify(i), value); err != nil && first == nil {
					first = err
				}
			case err := <-f.Err():
				if first == nil {
					first = fmt.Errorf("write %d: %w", i, err)
				}
			case <-ctx.Done():
				if first == nil {
					first = ctx.Err()
				}
			}
			i++
		}
		if err := r.tell.Flush(); err != nil && first == nil {
			first = err
		}
		told <- first
	}()
	for i := range n {
		f, err := js.PublishAsync("$KV.raw.d"+strconv.Itoa(i), value)
		if err != nil {
			close(acks)
			<-told
			return fmt.Errorf("write %d: %w", i, err)
		}
		acks <- f
	}
	close(acks)
	return <-told
}

// rawWriteWindow is the durable baseline's writes in flight, the
// coordinator's (broker's bulkWindow).
const rawWriteWindow = 512

func (r *responder) Close() {
	r.nc.Close()
	r.tell.Close()
}
