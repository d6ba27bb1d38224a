package broker

import (
	"io"
	"net/http"
	"os"
	"strconv"
	"testing"
)

// BenchmarkCacheRead reads one NAR file of CACHE_BENCH_MB (default 64)
// MiB through the agent's loopback substituter: the device's fetch path
// without Nix (JetStream, the coordinator, the device's connection, the
// agent's hash check and HTTP). With -cpuprofile it shows where the
// coordinator, the server and the agent spend their time:
//
//	go test ./broker -run '^$' -bench CacheRead -benchtime 5x -cpuprofile /tmp/cache.prof
func BenchmarkCacheRead(b *testing.B) {
	mb := 64
	if v, err := strconv.Atoi(os.Getenv("CACHE_BENCH_MB")); err == nil && v > 0 {
		mb = v
	}
	w := newCacheWorld(b)
	ni, raw, _ := w.fakeNar("bench", mb<<20)
	w.mustPush(raw)
	cs := w.serve()
	if code, _ := cacheGet(b, cs.URL()+"/"+ni.HashPart()+".narinfo"); code != http.StatusOK {
		b.Fatalf("narinfo: %d", code)
	}
	b.SetBytes(ni.FileSize)
	b.ResetTimer()
	for b.Loop() {
		resp, err := http.Get(cs.URL() + "/" + ni.URL)
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || n != ni.FileSize || resp.StatusCode != http.StatusOK {
			b.Fatalf("read %d of %d bytes, status %d: %v", n, ni.FileSize, resp.StatusCode, err)
		}
	}
}
