package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/admin"
	"fleet/agent"
	"fleet/broker"
	"fleet/internal/poll"
	"fleet/model"
	"fleet/nixtest"
	"fleet/subjects"
)

// BenchmarkCacheFetch fetches one closure of CACHE_BENCH_MB (default 100)
// MiB with nix copy --from, alternately from a plain HTTP binary cache
// (python3 -m http.server over the file:// cache nix copy wrote) and from
// the fleet cache over a device's NATS connection (the same narinfos and
// NAR files, pushed), three times each, and reports both throughputs and
// their ratio (medians). Two closures: "libs", ten store paths of the
// machine's own shared libraries (real binaries, which compress as a
// system's closure does), and "random", one path of incompressible bytes,
// the worst case for the fleet path (every byte crosses it, and Nix has
// nothing to decompress). It needs root, Nix and python3:
//
//	go test ./integration -run '^$' -bench CacheFetch -benchtime 1x
func BenchmarkCacheFetch(b *testing.B) {
	nixtest.Require(b)
	if _, err := exec.LookPath("python3"); err != nil {
		b.Skip("python3 not found: it serves the HTTP cache compared with")
	}
	mb := 100
	if v := os.Getenv("CACHE_BENCH_MB"); v != "" {
		_, _ = fmt.Sscan(v, &mb)
	}
	b.Run("libs", func(b *testing.B) { benchFetch(b, mb, libsClosure) })
	b.Run("random", func(b *testing.B) { benchFetch(b, mb, randomClosure) })
}

// libsClosure adds ten store paths holding mb MiB of the machine's shared
// libraries between them.
func libsClosure(b *testing.B, env *nixtest.Env, mb int) []string {
	const paths = 10
	var files []string
	var total int64
	_ = filepath.WalkDir("/usr/lib", func(p string, d os.DirEntry, err error) error {
		if err != nil || total >= int64(mb)<<20 {
			return filepath.SkipDir
		}
		if !d.Type().IsRegular() || !strings.Contains(d.Name(), ".so") {
			return nil
		}
		if info, err := d.Info(); err == nil {
			files = append(files, p)
			total += info.Size()
		}
		return nil
	})
	if total < int64(mb)<<20 {
		b.Skipf("/usr/lib holds %d MiB of shared libraries, not %d", total>>20, mb)
	}
	var out []string
	for i := range paths {
		dir := filepath.Join(env.Dir, fmt.Sprintf("libs-%d", i))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			b.Fatal(err)
		}
		for j := i; j < len(files); j += paths {
			data, err := os.ReadFile(files[j])
			if err != nil {
				b.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("%05d-%s", j, filepath.Base(files[j]))), data, 0o644); err != nil {
				b.Fatal(err)
			}
		}
		out = append(out, strings.TrimSpace(runEnv(b, env, "nix-store", "--add", dir)))
	}
	return out
}

// randomClosure builds one store path of mb MiB of random bytes.
func randomClosure(b *testing.B, env *nixtest.Env, mb int) []string {
	expr := fmt.Sprintf(`derivation { name = "bench-%d"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "/bin/dd if=/dev/urandom of=$out bs=1048576 count=%d" ]; nonce = "%d"; }`,
		mb, mb, time.Now().UnixNano())
	file := filepath.Join(env.Dir, "bench.nix")
	if err := os.WriteFile(file, []byte(expr), 0o644); err != nil {
		b.Fatal(err)
	}
	return []string{strings.TrimSpace(runEnv(b, env, "nix-build", "--no-out-link", file))}
}

func benchFetch(b *testing.B, mb int, closure func(*testing.B, *nixtest.Env, int) []string) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	env, err := nixtest.New(ctx, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	_ = env.Close()
	paths := closure(b, env, mb)
	runEnv(b, env, "nix", append([]string{"store", "sign", "--key-file", env.TrustedKey.SecretFile}, paths...)...)
	stage := filepath.Join(env.Dir, "stage")
	runEnv(b, env, "nix", append([]string{"copy", "--to", "file://" + stage + "?compression=zstd"}, paths...)...)

	// The HTTP cache.
	port := freePort(b)
	py := exec.CommandContext(ctx, "python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory", stage, port)
	if err := py.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = py.Process.Kill(); _ = py.Wait() }()
	httpURL := "http://127.0.0.1:" + port
	poll.Until(b, 10*time.Second, "python http.server up", func() bool {
		c, err := net.Dial("tcp", "127.0.0.1:"+port)
		if err == nil {
			c.Close()
		}
		return err == nil
	})

	// The fleet cache: a coordinator, the paths pushed, a device.
	cfg := broker.DefaultConfig()
	cfg.DataDir = b.TempDir()
	cfg.Listen = "127.0.0.1:0"
	cfg.HTTP = ""
	coord, err := broker.Start(ctx, cfg, zerolog.Nop())
	if err != nil {
		b.Fatal(err)
	}
	defer coord.Close()
	owner, err := admin.Dial(ctx, "nats://"+coord.ClientAddr(), filepath.Join(cfg.DataDir, accounts.AdminCredsFile))
	if err != nil {
		b.Fatal(err)
	}
	defer owner.Close()
	os.Setenv("NIX_CONFIG", env.NixConfig())
	defer os.Unsetenv("NIX_CONFIG")
	if _, err := admin.PushToFleetCache(ctx, owner, paths, admin.PushOpts{StageDir: stage, Compression: "zstd"}, nil); err != nil {
		b.Fatal(err)
	}
	dev, err := coord.Authority().NewUser(subjects.RoleAgent, "bench", 0)
	if err != nil {
		b.Fatal(err)
	}
	recordBenchDevice(b, coord, dev)
	seed, _ := dev.Key.Seed()
	nc, err := nats.Connect("nats://"+coord.ClientAddr(), nats.UserJWTAndSeed(dev.JWT, string(seed)), nats.CustomInboxPrefix(dev.InboxPrefix()))
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()

	var wire int64 // NAR file bytes, as stored (compressed)
	fetch := func(from string) time.Duration {
		for _, p := range paths {
			if err := env.Delete(ctx, p); err != nil {
				b.Fatal(err)
			}
		}
		start := time.Now()
		runEnv(b, env, "nix", append([]string{"copy", "--from", from}, paths...)...)
		return time.Since(start)
	}
	var httpT, natsT []time.Duration
	for range 3 {
		httpT = append(httpT, fetch(httpURL))
		cs, err := agent.ServeFleetCache(nc, dev.PublicKey(), zerolog.Nop())
		if err != nil {
			b.Fatal(err)
		}
		natsT = append(natsT, fetch(cs.URL()))
		wire = cs.NarBytes()
		_ = cs.Close()
	}
	slices.Sort(httpT)
	slices.Sort(natsT)
	size := float64(mb) // MiB
	httpRate, natsRate := size/httpT[1].Seconds(), size/natsT[1].Seconds()
	b.ReportMetric(httpRate, "http-MiB/s")
	b.ReportMetric(natsRate, "nats-MiB/s")
	b.ReportMetric(natsRate/httpRate, "ratio")
	b.Logf("%d MiB closure in %d paths (%d MiB of NAR files), nix copy --from: HTTP (python3 http.server) %v = %.0f MiB/s; fleet cache over NATS %v = %.0f MiB/s; ratio %.2f (medians of 3; all: %v / %v)",
		mb, len(paths), wire>>20, httpT[1].Round(time.Millisecond), httpRate, natsT[1].Round(time.Millisecond), natsRate, natsRate/httpRate, httpT, natsT)
}

func runEnv(tb testing.TB, env *nixtest.Env, name string, args ...string) string {
	tb.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = env.Environ()
	out, err := cmd.Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr)
	}
	return string(out)
}

func freePort(tb testing.TB) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	return fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
}

// recordBenchDevice records dev as an active device, as enrolment would.
func recordBenchDevice(tb testing.TB, c *broker.Coordinator, dev *accounts.Creds) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv, err := c.JetStream().KeyValue(ctx, subjects.BucketDevices)
	if err != nil {
		tb.Fatal(err)
	}
	rec, _ := json.Marshal(model.Device{ID: dev.PublicKey(), Name: "bench", Site: subjects.DefaultSite, Status: model.DeviceActive, EnrolledAt: time.Now().UTC()})
	if _, err := kv.Put(ctx, dev.PublicKey(), rec); err != nil {
		tb.Fatal(err)
	}
}
