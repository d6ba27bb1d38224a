package broker

import (
	"cmp"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"fleet/model"
	"fleet/subjects"
)

// Figures and how to reproduce them: BENCHMARKS.md.

func benchIDs(b *testing.B, n int) []string {
	b.Helper()
	ids := make([]string, n)
	for i := range ids {
		kp, err := nkeys.CreateUser()
		if err != nil {
			b.Fatal(err)
		}
		ids[i], _ = kp.PublicKey()
	}
	return ids
}

func benchFacts(id string, i int) []byte {
	f := model.Facts{
		Device: id, Time: time.Now().UTC(), Hostname: fmt.Sprintf("host%05d", i),
		NixOSVersion: "25.11", CurrentSystem: storePath(fmt.Sprintf("gen%d", i%7)), BootedSystem: storePath("gen0"),
		Kernel: "6.12.30", UptimeSeconds: 86400, Load: [3]float64{0.1, 0.2, 0.3}, MemoryTotal: 16 << 30, MemoryAvail: 9 << 30,
		Mounts: []model.Mount{
			{Path: "/", Device: "/dev/mapper/root", FSType: "ext4", SizeBytes: 500 << 30, UsedBytes: uint64(i%100) << 30},
			{Path: "/boot", Device: "/dev/nvme0n1p1", FSType: "vfat", SizeBytes: 1 << 30, UsedBytes: 300 << 20},
		},
		AgentVersion: "dev",
		LastApply:    &model.LastApply{Result: model.ResultSucceeded, Time: time.Now().UTC()},
	}
	b, _ := json.Marshal(f)
	return b
}

// fillIndex puts n devices with records, facts and desired states straight
// into the coordinator's index (no NATS), as if the streams had delivered
// them.
func fillIndex(b *testing.B, x *deviceIndex, n int) []string {
	ids := benchIDs(b, n)
	now := time.Now()
	for i, id := range ids {
		rec, _ := json.Marshal(model.Device{ID: id, Name: fmt.Sprintf("host%05d", i), Groups: []string{"lab"}, Status: model.DeviceActive})
		x.applyRecord(id, rec)
		x.applyFacts(id, benchFacts(id, i), now)
		des, _ := json.Marshal(model.Desired{Device: id, StorePath: storePath("gen1"), RolloutID: "r-1"})
		x.applyDesired(id, des)
	}
	return ids
}

// BenchmarkMetricsScrape is one full /metrics scrape (text format, and
// gzipped as Prometheus asks) with 10,000 devices in the index, NATS and Go
// collectors included. The page streams to a writer that counts it, as to
// a socket.
func BenchmarkMetricsScrape(b *testing.B) {
	f := startVis(b, false)
	fillIndex(b, f.c.index, 10000)
	h := metricsHandler(f.c.metrics)
	for _, enc := range []string{"", "gzip"} {
		b.Run("encoding="+cmp.Or(enc, "identity"), func(b *testing.B) {
			var w countingWriter
			b.ReportAllocs()
			for b.Loop() {
				w = countingWriter{header: http.Header{}}
				req := httptest.NewRequest("GET", "/metrics", nil)
				req.Header.Set("Accept-Encoding", enc)
				h.ServeHTTP(&w, req)
				if w.code != 0 && w.code != http.StatusOK {
					b.Fatal(w.code)
				}
			}
			b.ReportMetric(float64(w.n), "bytes/scrape")
		})
	}
}

// countingWriter is an http.ResponseWriter that counts what it is sent.
type countingWriter struct {
	header http.Header
	code   int
	n      int
}

func (w *countingWriter) Header() http.Header  { return w.header }
func (w *countingWriter) WriteHeader(code int) { w.code = code }
func (w *countingWriter) Write(p []byte) (int, error) {
	w.n += len(p)
	return len(p), nil
}

// BenchmarkIndexApplyFacts is the index's own cost per facts message
// (decode and copy-on-write update) with 10,000 devices, while a scraper
// reads snapshots as fast as it can: ingestion does not wait for scrapes.
func BenchmarkIndexApplyFacts(b *testing.B) {
	for _, scraping := range []bool{false, true} {
		b.Run(fmt.Sprintf("scraping=%v", scraping), func(b *testing.B) {
			f := startVis(b, false)
			ids := fillIndex(b, f.c.index, 10000)
			msgs := make([][]byte, len(ids))
			for i, id := range ids {
				msgs[i] = benchFacts(id, i+1)
			}
			var stop atomic.Bool
			done := make(chan struct{})
			scrapes := 0
			if scraping {
				h := metricsHandler(f.c.metrics)
				go func() {
					defer close(done)
					for !stop.Load() {
						h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/metrics", nil))
						scrapes++
					}
				}()
			} else {
				close(done)
			}
			now := time.Now()
			b.ReportAllocs()
			b.ResetTimer()
			i := 0
			for b.Loop() {
				f.c.index.applyFacts(ids[i%len(ids)], msgs[i%len(ids)], now)
				i++
			}
			b.StopTimer()
			stop.Store(true)
			<-done
			if scraping {
				b.ReportMetric(float64(scrapes), "scrapes")
			}
		})
	}
}

// publishFacts sends n facts reports over 1,000 device subjects with async
// JetStream publishes and waits for every ack.
func publishFacts(b *testing.B, js jetstream.JetStream, ids []string, msgs [][]byte, n int) {
	for i := range n {
		for {
			if _, err := js.PublishAsync(subjects.DeviceFacts(ids[i%len(ids)]), msgs[i%len(msgs)]); err == nil {
				break
			} else if err != jetstream.ErrTooManyStalledMsgs {
				b.Fatal(err)
			}
			<-js.PublishAsyncComplete()
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(60 * time.Second):
		b.Fatal("publish acks did not arrive within 60s")
	}
}

func benchPublishSetup(b *testing.B) (*visFleet, jetstream.JetStream, []string, [][]byte) {
	f := startVis(b, false)
	js, err := jetstream.New(f.c.Conn(), jetstream.WithPublishAsyncMaxPending(4096))
	if err != nil {
		b.Fatal(err)
	}
	ids := benchIDs(b, 1000)
	msgs := make([][]byte, len(ids))
	for i, id := range ids {
		msgs[i] = benchFacts(id, i)
	}
	return f, js, ids, msgs
}

// BenchmarkRawPublish is the baseline: facts stored in FLEET_FACTS (acked),
// nobody waiting for the index.
func BenchmarkRawPublish(b *testing.B) {
	_, js, ids, msgs := benchPublishSetup(b)
	b.ResetTimer()
	publishFacts(b, js, ids, msgs, b.N)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}

// BenchmarkFactsIngest is the same publishing, timed until the index has
// taken in every report: the end-to-end rate of agent facts to /metrics.
func BenchmarkFactsIngest(b *testing.B) {
	f, js, ids, msgs := benchPublishSetup(b)
	start := f.c.index.stats.facts.Load()
	b.ResetTimer()
	publishFacts(b, js, ids, msgs, b.N)
	deadline := time.Now().Add(60 * time.Second)
	for f.c.index.stats.facts.Load() < start+uint64(b.N) {
		if time.Now().After(deadline) {
			b.Fatalf("index took in %d of %d facts within 60s", f.c.index.stats.facts.Load()-start, b.N)
		}
		time.Sleep(time.Millisecond)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}
