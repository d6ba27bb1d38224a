package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/model"
	"fleet/subjects"
)

// benchFleet is a coordinator with n device records and a device simulator
// on one connection: it answers each desired state with a succeeded event
// published to JetStream, as n agents would. The engine's cost per device
// is what the rollout benchmark measures.
type benchFleet struct {
	c     *Coordinator
	admin nkeys.KeyPair
	ids   []string
	sim   *nats.Conn
}

func startBenchFleet(b *testing.B, n int) *benchFleet {
	b.Helper()
	cfg := DefaultConfig()
	cfg.DataDir, cfg.Listen, cfg.HTTP = b.TempDir(), "127.0.0.1:0", ""
	c, err := Start(context.Background(), cfg, zerolog.Nop())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(c.Close)
	ctx := context.Background()
	devKV, _ := c.JetStream().KeyValue(ctx, subjects.BucketDevices)
	f := &benchFleet{c: c}
	f.admin, _ = nkeys.CreateUser()
	for i := range n {
		kp, _ := nkeys.CreateUser()
		id, _ := kp.PublicKey()
		rec, _ := json.Marshal(model.Device{ID: id, Name: fmt.Sprintf("d%05d", i), Groups: []string{"bench"}, Status: model.DeviceActive})
		if _, err := devKV.Put(ctx, id, rec); err != nil {
			b.Fatal(err)
		}
		f.ids = append(f.ids, id)
	}
	svc, _ := c.Authority().ServiceUser("bench-devices")
	if f.sim, err = c.InProcessConn(svc, "bench-devices"); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(f.sim.Close)
	return f
}

// simulate answers the devices' desired-state triggers with events.
func (f *benchFleet) simulate(b *testing.B) {
	js, err := jetstream.New(f.sim, jetstream.WithPublishAsyncMaxPending(4096))
	if err != nil {
		b.Fatal(err)
	}
	_, err = f.sim.Subscribe(subjects.DeviceNotify("*", "*"), func(m *nats.Msg) {
		var r model.DesiredReply
		var d model.Desired
		if json.Unmarshal(m.Data, &r) != nil || json.Unmarshal(r.Desired, &d) != nil {
			return
		}
		ev, _ := json.Marshal(model.Event{Device: d.Device, Time: time.Now(), State: model.StateReporting,
			Result: model.ResultSucceeded, RolloutID: d.RolloutID, ReleaseID: d.ReleaseID, StorePath: d.StorePath})
		_, _ = js.PublishAsync(subjects.DeviceEvents(d.Device), ev)
	})
	if err != nil {
		b.Fatal(err)
	}
}

func (f *benchFleet) release(b *testing.B, id string) {
	pub, _ := f.admin.PublicKey()
	s, _ := model.Sign(f.admin, model.PurposeRelease, model.Release{ID: id, CreatedAt: time.Now().UTC(), Author: pub,
		Default: "/nix/store/" + "0123456789abcdfghijklmnpqrsvwxyz" + "-" + id})
	v, _ := json.Marshal(s)
	kv, _ := f.c.JetStream().KeyValue(context.Background(), subjects.BucketReleases)
	if _, err := kv.Create(context.Background(), id, v); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkRollout is one rollout (one batch of every device) from Create
// until the summary says succeeded: desired states written in bulk, every
// device's result taken in and recorded.
func BenchmarkRollout(b *testing.B) {
	for _, n := range []int{100, 1000} {
		b.Run(fmt.Sprintf("devices=%d", n), func(b *testing.B) {
			f := startBenchFleet(b, n)
			f.simulate(b)
			ctx := context.Background()
			b.ResetTimer()
			for i := range b.N {
				b.StopTimer()
				rel := fmt.Sprintf("rel-%d", i)
				f.release(b, rel)
				b.StartTimer()
				ro, err := f.c.rollouts.Create(ctx, model.DeployRequest{ReleaseID: rel, Group: "bench", Strategy: "all", Supersede: true}, "bench", nil)
				if err != nil {
					b.Fatal(err)
				}
				deadline := time.Now().Add(2 * time.Minute)
				for {
					got, _, err := f.c.rollouts.Get(ctx, ro.ID)
					if err == nil && got.State == model.RolloutSucceeded {
						break
					}
					if time.Now().After(deadline) {
						b.Fatalf("rollout not done within 2m: %+v", got)
					}
					time.Sleep(2 * time.Millisecond)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "devices/s")
		})
	}
}

// BenchmarkRawRoundTrip is the NATS floor for the same traffic: a desired
// state published to each device subject and a succeeded event back,
// acked by JetStream, with no engine in between.
func BenchmarkRawRoundTrip(b *testing.B) {
	for _, n := range []int{100, 1000} {
		b.Run(fmt.Sprintf("devices=%d", n), func(b *testing.B) {
			f := startBenchFleet(b, n)
			f.simulate(b)
			var got atomic.Int64
			sub, err := f.c.Conn().Subscribe(subjects.AllEvents, func(*nats.Msg) { got.Add(1) })
			if err != nil {
				b.Fatal(err)
			}
			defer sub.Unsubscribe()
			f.c.Conn().Flush()
			pub, _ := f.admin.PublicKey()
			s, _ := model.Sign(f.admin, model.PurposeRelease, model.Release{ID: "raw", CreatedAt: time.Now().UTC(), Author: pub, Default: "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-raw"})
			b.ResetTimer()
			for i := range b.N {
				want := int64((i + 1) * n)
				for _, id := range f.ids {
					d, _ := json.Marshal(model.Desired{Device: id, ReleaseID: "raw", RolloutID: "raw", StorePath: "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-raw", Release: s})
					if err := f.c.Conn().Publish(subjects.DeviceDesired(id), d); err != nil {
						b.Fatal(err)
					}
				}
				deadline := time.Now().Add(time.Minute)
				for got.Load() < want {
					if time.Now().After(deadline) {
						b.Fatalf("%d of %d events", got.Load(), want)
					}
					time.Sleep(time.Millisecond)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "devices/s")
		})
	}
}
