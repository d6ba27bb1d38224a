package broker

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/admin"
	"fleet/agent"
	"fleet/internal/poll"
	"fleet/internal/promvalue"
	"fleet/model"
	"fleet/subjects"
)

// cacheWorld is a coordinator, its owner and one active device.
type cacheWorld struct {
	t     testing.TB
	c     *Coordinator
	owner *admin.Client
	dev   *accounts.Creds
	nc    *client
	stage string
}

func newCacheWorld(t testing.TB) *cacheWorld {
	t.Helper()
	dir := t.TempDir()
	c := startCoordinator(t, testConfig(dir))
	owner, err := admin.Dial(ctxT(t, 10*time.Second), c.ClientURL(), filepath.Join(dir, accounts.AdminCredsFile))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(owner.Close)
	dev, err := c.Authority().NewUser(subjects.RoleAgent, "laptop", 0)
	if err != nil {
		t.Fatal(err)
	}
	recordDevice(t, c, dev.PublicKey(), subjects.DefaultSite)
	return &cacheWorld{t: t, c: c, owner: owner, dev: dev, nc: mustDial(t, c.ClientURL(), dev), stage: t.TempDir()}
}

// fakeNar stages a NAR file of size random bytes (uncompressed) and its
// narinfo, as nix copy --to file:// would; refs are store path names.
func (w *cacheWorld) fakeNar(name string, size int, refs ...string) (*model.NarInfo, []byte, []byte) {
	w.t.Helper()
	data := make([]byte, size)
	_, _ = rand.Read(data)
	var h [20]byte
	_, _ = rand.Read(h[:])
	var sig [64]byte
	_, _ = rand.Read(sig[:])
	sum := sha256.Sum256(data)
	ni := &model.NarInfo{
		StorePath: "/nix/store/" + model.Nix32Encode(h[:]) + "-" + name, Compression: "none",
		URL: "nar/" + model.Nix32Encode(sum[:]) + ".nar", FileHash: model.SHA256Nix(sum[:]), FileSize: int64(size),
		NarHash: model.SHA256Nix(sum[:]), NarSize: int64(size), References: refs,
		Sigs: []string{"test-1:" + base64.StdEncoding.EncodeToString(sig[:])},
	}
	if err := os.MkdirAll(filepath.Join(w.stage, "nar"), 0o755); err != nil {
		w.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.stage, ni.URL), data, 0o644); err != nil {
		w.t.Fatal(err)
	}
	return ni, []byte(ni.String()), data
}

// setCache changes the cache's settings.
func (w *cacheWorld) setCache(f func(*cacheStore)) {
	cs := w.c.svc.cache
	cs.mu.Lock()
	defer cs.mu.Unlock()
	f(cs)
}

func (w *cacheWorld) push(raw []byte) (int64, error) {
	return admin.PushNarInfo(ctxT(w.t, 30*time.Second), w.owner, w.stage, raw)
}

func (w *cacheWorld) mustPush(raw []byte) int64 {
	w.t.Helper()
	n, err := w.push(raw)
	if err != nil {
		w.t.Fatal(err)
	}
	return n
}

// stored reports whether the cache has ni's narinfo and its NAR file.
func (w *cacheWorld) stored(ni *model.NarInfo) (narinfo, file bool) {
	w.t.Helper()
	ctx := ctxT(w.t, 10*time.Second)
	kv, err := w.c.JetStream().KeyValue(ctx, subjects.BucketNarInfo)
	if err != nil {
		w.t.Fatal(err)
	}
	_, err = kv.Get(ctx, ni.HashPart())
	narinfo = err == nil
	obs, err := w.c.JetStream().ObjectStore(ctx, subjects.ObjectCache)
	if err != nil {
		w.t.Fatal(err)
	}
	_, err = obs.GetInfo(ctx, ni.URL)
	return narinfo, err == nil
}

func (w *cacheWorld) serve() *agent.CacheServer {
	w.t.Helper()
	cs, err := agent.ServeFleetCache(w.nc.Conn, w.dev.PublicKey(), zerolog.Nop())
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { _ = cs.Close() })
	return cs
}

func cacheGet(t testing.TB, url string) (int, []byte) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return -1, b // cut off
	}
	return resp.StatusCode, b
}

// A pushed path is stored once and read back by a device through the
// loopback substituter, window by window; a second push sends nothing.
func TestCachePushAndDeviceRead(t *testing.T) {
	w := newCacheWorld(t)
	dep, depRaw, _ := w.fakeNar("dep", 1000)
	// Two full windows and a bit: three reads.
	ni, raw, data := w.fakeNar("system", 2*cacheWindowBytes/int(w.c.svc.cache.objChunk())*int(w.c.svc.cache.objChunk())+12345, strings.TrimPrefix(dep.StorePath, "/nix/store/"))
	if n := w.mustPush(depRaw); n != 1000 {
		t.Fatalf("pushed %d bytes of dep", n)
	}
	if n := w.mustPush(raw); n != int64(len(data)) {
		t.Fatalf("pushed %d bytes, want %d", n, len(data))
	}
	if n := w.mustPush(raw); n != 0 {
		t.Fatalf("second push sent %d bytes", n)
	}
	var q model.CacheQueryReply
	var other [20]byte
	_, _ = rand.Read(other[:])
	if err := w.owner.Call(ctxT(t, 10*time.Second), subjects.VerbCacheQuery, false,
		model.CacheQuery{Hashes: []string{ni.HashPart(), model.Nix32Encode(other[:])}}, &q); err != nil {
		t.Fatal(err)
	}
	if len(q.Missing) != 1 || q.Missing[0] != model.Nix32Encode(other[:]) || strings.Join(q.Signed[ni.HashPart()], ",") != "test-1" {
		t.Fatalf("query %+v", q)
	}

	cs := w.serve()
	if code, b := cacheGet(t, cs.URL()+"/nix-cache-info"); code != 200 || !strings.Contains(string(b), "StoreDir: /nix/store") {
		t.Fatalf("nix-cache-info %d %q", code, b)
	}
	code, b := cacheGet(t, cs.URL()+"/"+ni.HashPart()+".narinfo")
	if code != 200 || string(b) != ni.String() {
		t.Fatalf("narinfo %d %q", code, b)
	}
	code, b = cacheGet(t, cs.URL()+"/"+ni.URL)
	if code != 200 || !bytes.Equal(b, data) {
		t.Fatalf("NAR: %d, %d bytes (want %d)", code, len(b), len(data))
	}
	if code, _ := cacheGet(t, cs.URL()+"/"+model.Nix32Encode(other[:])+".narinfo"); code != 404 {
		t.Fatalf("missing narinfo: %d", code)
	}
	if cs.NarBytes() != int64(len(data)) || cs.Refused() != nil {
		t.Fatalf("served %d bytes, refused %v", cs.NarBytes(), cs.Refused())
	}
	if v := cacheMetric(t, w.c, "fleet_cache_requests_total", map[string]string{"site": "hub", "kind": "nar", "result": "hit"}); v != 3 {
		t.Fatalf("NAR windows read: %v, want 3", v)
	}
	if v := cacheMetric(t, w.c, "fleet_cache_narinfos", nil); v != 2 {
		t.Fatalf("fleet_cache_narinfos %v", v)
	}
	if v := cacheMetric(t, w.c, "fleet_cache_bytes", nil); v != float64(len(data)+1000) {
		t.Fatalf("fleet_cache_bytes %v", v)
	}
}

func cacheMetric(t *testing.T, c *Coordinator, name string, labels map[string]string) float64 {
	t.Helper()
	v, _, err := promvalue.Get(c.Metrics(), name, labels)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// Pushes that must leave nothing behind: a file that does not match its
// narinfo, chunks out of order, an upload that stops half way; and what
// the coordinator refuses outright.
func TestCachePushRefused(t *testing.T) {
	w := newCacheWorld(t)
	w.setCache(func(cs *cacheStore) { cs.idle = 300 * time.Millisecond })

	// The file differs from what the narinfo says (same size).
	ni, raw, _ := w.fakeNar("tampered", 700<<10)
	other := make([]byte, ni.FileSize)
	_, _ = rand.Read(other)
	if err := os.WriteFile(filepath.Join(w.stage, ni.URL), other, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := w.push(raw)
	wantErr(t, err, "does not match its narinfo", "refused")
	if n, f := w.stored(ni); n || f {
		t.Fatalf("after a mismatched push: narinfo %v, file %v", n, f)
	}

	// Half an upload, then silence: the coordinator gives up, nothing
	// stays, and a whole push afterwards works.
	ni, raw, data := w.fakeNar("interrupted", 900<<10)
	var r model.CachePutReply
	if err := w.owner.Call(ctxT(t, 10*time.Second), subjects.VerbCachePut, true, model.CachePut{NarInfo: string(raw)}, &r); err != nil {
		t.Fatal(err)
	}
	ack := sendChunk(t, w.owner, r.Subject, 0, data[:r.Chunk], false)
	if ack.Error != "" || ack.Received != int64(r.Chunk) {
		t.Fatalf("first chunk: %+v", ack)
	}
	poll.Until(t, 10*time.Second, "the interrupted upload ended", func() bool {
		w.c.svc.cache.mu.Lock()
		defer w.c.svc.cache.mu.Unlock()
		return len(w.c.svc.cache.uploads) == 0
	})
	if n, f := w.stored(ni); n || f {
		t.Fatalf("after an interrupted push: narinfo %v, file %v", n, f)
	}
	w.mustPush(raw)
	if n, f := w.stored(ni); !n || !f {
		t.Fatalf("after a whole push: narinfo %v, file %v", n, f)
	}

	// A chunk out of order ends the upload.
	ni, raw, data = w.fakeNar("unordered", 900<<10)
	if err := w.owner.Call(ctxT(t, 10*time.Second), subjects.VerbCachePut, true, model.CachePut{NarInfo: string(raw)}, &r); err != nil {
		t.Fatal(err)
	}
	if ack := sendChunk(t, w.owner, r.Subject, 1000, data[1000:2000], false); !strings.Contains(ack.Error, "offset") {
		t.Fatalf("chunk out of order: %+v", ack)
	}
	// More than the narinfo's size.
	ni2, raw2, data2 := w.fakeNar("long", 1000)
	if err := w.owner.Call(ctxT(t, 10*time.Second), subjects.VerbCachePut, true, model.CachePut{NarInfo: string(raw2)}, &r); err != nil {
		t.Fatal(err)
	}
	if ack := sendChunk(t, w.owner, r.Subject, 0, append(data2, 1), true); !strings.Contains(ack.Error, "FileSize") {
		t.Fatalf("chunk past the size: %+v", ack)
	}
	for _, x := range []*model.NarInfo{ni, ni2} {
		if n, f := w.stored(x); n || f {
			t.Fatalf("%s: narinfo %v, file %v", x.StorePath, n, f)
		}
	}

	// Refused at once: malformed, unsigned, a viewer.
	_, raw, _ = w.fakeNar("bad", 10)
	for name, text := range map[string]string{
		"unknown field":  string(raw) + "Evil: yes\n",
		"url not hash":   strings.Replace(string(raw), "URL: nar/", "URL: nar/0", 1),
		"unsigned":       regexpCut(string(raw), "Sig: "),
		"no store path":  regexpCut(string(raw), "StorePath: "),
		"negative size":  strings.Replace(string(raw), "FileSize: 10", "FileSize: -10", 1),
		"oversized json": strings.Repeat("x", 70<<10),
	} {
		err := w.owner.Call(ctxT(t, 10*time.Second), subjects.VerbCachePut, true, model.CachePut{NarInfo: text}, &r)
		var ae *admin.APIError
		if !errors.As(err, &ae) || ae.Code != model.CodeBadRequest {
			t.Errorf("%s: %v", name, err)
		}
	}
	viewer, err := c2admin(t, w.c, subjects.RoleViewer, "viewer")
	if err != nil {
		t.Fatal(err)
	}
	_, raw, data = w.fakeNar("viewer", 10)
	err = viewer.Call(ctxT(t, 10*time.Second), subjects.VerbCachePut, true, model.CachePut{NarInfo: string(raw)}, &r)
	wantErr(t, err, "needs role operator")

	// Another admin's chunks for the owner's upload are dropped.
	w.setCache(func(cs *cacheStore) { cs.idle = time.Minute })
	ni, raw, data = w.fakeNar("hijack", 1000)
	if err := w.owner.Call(ctxT(t, 10*time.Second), subjects.VerbCachePut, true, model.CachePut{NarInfo: string(raw)}, &r); err != nil {
		t.Fatal(err)
	}
	before := cacheMetric(t, w.c, "fleet_requests_dropped_total", map[string]string{"handler": "cache-upload", "reason": dropReply})
	m := nats.NewMsg(r.Subject)
	m.Data = data
	m.Header.Set(subjects.HeaderCacheOffset, "0")
	m.Header.Set(subjects.HeaderCacheEnd, "1")
	if _, err := viewer.RawConn().RequestMsg(m, 300*time.Millisecond); !errors.Is(err, nats.ErrTimeout) {
		t.Fatalf("viewer's chunk: %v", err)
	}
	poll.Until(t, 5*time.Second, "the viewer's chunk dropped", func() bool {
		return cacheMetric(t, w.c, "fleet_requests_dropped_total", map[string]string{"handler": "cache-upload", "reason": dropReply}) > before
	})
	if ack := sendChunk(t, w.owner, r.Subject, 0, data, true); ack.Error != "" || !ack.Stored {
		t.Fatalf("owner's chunk after the viewer's: %+v", ack)
	}
}

func regexpCut(s, prefix string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func c2admin(t *testing.T, c *Coordinator, r subjects.Role, name string) (*admin.Client, error) {
	t.Helper()
	cr, err := c.Authority().NewUser(r, name, 0)
	if err != nil {
		return nil, err
	}
	kv, err := c.JetStream().KeyValue(ctxT(t, 10*time.Second), subjects.BucketAdmins)
	if err != nil {
		return nil, err
	}
	b, _ := json.Marshal(model.Admin{Key: cr.PublicKey(), Name: name, Role: string(r), CreatedAt: time.Now()})
	if _, err := kv.Put(ctxT(t, 10*time.Second), cr.PublicKey(), b); err != nil {
		return nil, err
	}
	cl, err := admin.DialCreds(ctxT(t, 10*time.Second), c.ClientURL(), cr)
	if err != nil {
		return nil, err
	}
	t.Cleanup(cl.Close)
	return cl, nil
}

func sendChunk(t *testing.T, c *admin.Client, subj string, off int, data []byte, end bool) model.CacheChunkReply {
	t.Helper()
	m := nats.NewMsg(subj)
	m.Data = data
	m.Header.Set(subjects.HeaderCacheOffset, strconv.Itoa(off))
	if end {
		m.Header.Set(subjects.HeaderCacheEnd, "1")
	}
	resp, err := c.RawConn().RequestMsg(m, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var ack model.CacheChunkReply
	if err := json.Unmarshal(resp.Data, &ack); err != nil {
		t.Fatal(err)
	}
	return ack
}

// deviceRead sends a raw cache read as the device and collects the reply
// messages up to the window's end (or an error reply).
func (w *cacheWorld) deviceRead(body []byte) ([]*nats.Msg, error) {
	w.t.Helper()
	sub, err := w.nc.SubscribeSync(w.nc.NewInbox())
	if err != nil {
		w.t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := w.nc.PublishRequest(subjects.CacheGetFor(w.dev.PublicKey()), sub.Subject, body); err != nil {
		w.t.Fatal(err)
	}
	var out []*nats.Msg
	for {
		m, err := sub.NextMsg(2 * time.Second)
		if err != nil {
			return out, err
		}
		out = append(out, m)
		// An error, or the end of the window's direct get.
		if m.Header.Get(subjects.HeaderCacheStatus) != "" || m.Header.Get("Status") != "" {
			return out, nil
		}
	}
}

// readStatus is the status a raw read gets ("" when it is not an error).
func (w *cacheWorld) readStatus(body string) string {
	w.t.Helper()
	msgs, err := w.deviceRead([]byte(body))
	if err != nil {
		w.t.Fatal(err)
	}
	return msgs[len(msgs)-1].Header.Get(subjects.HeaderCacheStatus)
}

// A device may only read the cache: never write it, never read another
// bucket or another file through it, and never with a request out of
// bounds; what it cannot do is a permissions violation or a refusal.
func TestCacheDeviceAttacks(t *testing.T) {
	w := newCacheWorld(t)
	chunk := int(w.c.svc.cache.objChunk())
	a, rawA, dataA := w.fakeNar("a", 3*chunk)
	b, rawB, _ := w.fakeNar("b", 3*chunk)
	w.mustPush(rawA)
	w.mustPush(rawB)

	// Writes and other devices' reads are the server's to refuse.
	other, err := w.c.Authority().NewUser(subjects.RoleAgent, "other", 0)
	if err != nil {
		t.Fatal(err)
	}
	recordDevice(t, w.c, other.PublicKey(), subjects.DefaultSite)
	for _, subj := range []string{subjects.APIWriteVerb(subjects.VerbCachePut), subjects.CacheChunk("x", "y"),
		subjects.CacheGetFor(other.PublicKey()), "$O." + subjects.ObjectCache + ".C.x", "$KV." + subjects.BucketNarInfo + "." + a.HashPart(),
		"$JS.API.DIRECT.GET.OBJ_" + subjects.ObjectCache, subjects.CacheDirect} {
		_ = w.nc.Publish(subj, []byte(`{}`))
		w.nc.errs.waitViolation(t, 5*time.Second, "Publish", subj)
	}

	// A reply into another device's inbox is dropped unanswered.
	before := cacheMetric(t, w.c, "fleet_requests_dropped_total", map[string]string{"handler": "cache", "reason": dropReply})
	q, _ := json.Marshal(model.CacheRead{NarInfo: a.HashPart()})
	if err := w.nc.PublishRequest(subjects.CacheGetFor(w.dev.PublicKey()), subjects.DeviceInboxPrefix(subjects.DefaultSite, other.PublicKey())+".x", q); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 5*time.Second, "reply into another inbox dropped", func() bool {
		return cacheMetric(t, w.c, "fleet_requests_dropped_total", map[string]string{"handler": "cache", "reason": dropReply}) > before
	})

	// Malformed and oversized reads are refused.
	for name, body := range map[string]string{
		"not json":          "nope",
		"oversized":         `{"narinfo":"` + strings.Repeat("a", 600) + `"}`,
		"both":              `{"narinfo":"` + a.HashPart() + `","nar":"` + a.URL + `"}`,
		"neither":           `{}`,
		"wildcard key":      `{"narinfo":">"}`,
		"path in key":       `{"narinfo":"../../KV_fleet_admins"}`,
		"not a nar":         `{"nar":"nar/../../fleet_admins"}`,
		"other object kind": `{"nar":"` + a.HashPart() + `.narinfo"}`,
		"object wildcard":   `{"nar":"` + a.URL + `","object":"*"}`,
	} {
		if st := w.readStatus(body); st != "400" {
			t.Errorf("%s: status %q, want 400", name, st)
		}
	}
	var none [32]byte
	if st := w.readStatus(`{"nar":"nar/` + model.Nix32Encode(none[:]) + `.nar"}`); st != "404" {
		t.Errorf("missing NAR: status %q", st)
	}

	// Whatever cursor it sends, a read of a returns a's bytes only.
	msgs, err := w.deviceRead([]byte(`{"nar":"` + a.URL + `"}`))
	if err != nil || len(msgs) != 5 { // a header, three chunks, the end
		t.Fatalf("read a: %d messages, %v", len(msgs), err)
	}
	var got []byte
	for _, m := range msgs {
		got = append(got, m.Data...)
	}
	if !bytes.Equal(got, dataA) {
		t.Fatal("a read back differs")
	}
	for _, after := range []uint64{0, 1, 2, 5, 1 << 40} {
		msgs, err := w.deviceRead([]byte(fmt.Sprintf(`{"nar":%q,"after":%d}`, a.URL, after)))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range msgs {
			if len(m.Data) > 0 && !bytes.Contains(dataA, m.Data) {
				t.Fatalf("after %d: a chunk that is not a's", after)
			}
		}
	}
	// A cursor naming b's object for a's file is refused.
	msgs, _ = w.deviceRead([]byte(`{"nar":"` + b.URL + `"}`))
	objB := msgs[0].Header.Get(subjects.HeaderCacheObject)
	if st := w.readStatus(fmt.Sprintf(`{"nar":%q,"object":%q}`, a.URL, objB)); st != "409" {
		t.Fatalf("a's file with b's object: status %q", st)
	}
}

// Retention keeps a kept release's closure and what is new, and removes
// the rest: narinfo and NAR file.
func TestCacheGC(t *testing.T) {
	w := newCacheWorld(t)
	dep, depRaw, _ := w.fakeNar("dep", 100)
	sys, sysRaw, _ := w.fakeNar("system", 100, strings.TrimPrefix(dep.StorePath, "/nix/store/"))
	old, oldRaw, _ := w.fakeNar("old", 100)
	for _, r := range [][]byte{depRaw, sysRaw, oldRaw} {
		w.mustPush(r)
	}
	// Everything is new: nothing goes.
	var res model.CacheGCResult
	if err := w.owner.Call(ctxT(t, 10*time.Second), subjects.VerbCacheGC, true, model.CacheGC{}, &res); err != nil {
		t.Fatal(err)
	}
	if res.Removed.Paths != 0 || res.Objects != 0 {
		t.Fatalf("gc of new paths: %+v", res)
	}
	// A release names the system; old is older than the grace.
	signer, err := accounts.ReadCreds(filepath.Join(w.c.Config().DataDir, accounts.AdminCredsFile))
	if err != nil {
		t.Fatal(err)
	}
	rel := model.Release{ID: "r1", CreatedAt: time.Now().UTC(), Author: signer.PublicKey(), Default: sys.StorePath, FleetCache: true, Action: model.ActionSwitch}
	signed, err := model.Sign(signer.Key, model.PurposeRelease, rel)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.owner.Call(ctxT(t, 10*time.Second), subjects.VerbReleaseCreate, true, signed, nil); err != nil {
		t.Fatal(err)
	}
	w.setCache(func(cs *cacheStore) { cs.grace = 0 })
	if err := w.owner.Call(ctxT(t, 10*time.Second), subjects.VerbCacheGC, true, model.CacheGC{DryRun: true}, &res); err != nil {
		t.Fatal(err)
	}
	if res.Removed.Paths != 1 || res.Kept.Paths != 2 || strings.Join(res.Releases, ",") != "r1" {
		t.Fatalf("dry run: %+v", res)
	}
	if n, f := w.stored(old); !n || !f {
		t.Fatal("a dry run removed something")
	}
	if err := w.owner.Call(ctxT(t, 10*time.Second), subjects.VerbCacheGC, true, model.CacheGC{}, &res); err != nil {
		t.Fatal(err)
	}
	if res.Removed.Paths != 1 || res.Objects != 1 {
		t.Fatalf("gc: %+v", res)
	}
	if n, f := w.stored(old); n || f {
		t.Fatalf("old after gc: narinfo %v, file %v", n, f)
	}
	for _, x := range []*model.NarInfo{dep, sys} {
		if n, f := w.stored(x); !n || !f {
			t.Fatalf("%s removed", x.StorePath)
		}
	}
	var rep model.CacheReport
	if err := w.owner.Call(ctxT(t, 10*time.Second), subjects.VerbCacheList, false, struct{}{}, &rep); err != nil {
		t.Fatal(err)
	}
	if rep.NarInfos != 2 || rep.Objects != 2 || len(rep.Releases) != 1 || rep.Releases[0].Paths != 2 || rep.Releases[0].Bytes != 200 || !rep.Releases[0].Kept {
		t.Fatalf("cache ls: %+v", rep)
	}
}

// Retention keeps each group's target: read from fleet_groups as the
// groups code writes it.
func TestCacheGroupTargets(t *testing.T) {
	w := newCacheWorld(t)
	ctx := ctxT(t, 10*time.Second)
	kv, err := w.c.JetStream().KeyValue(ctx, subjects.BucketGroups)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(model.GroupTarget{Group: "developers", ReleaseID: "r-old", SetAt: time.Now()})
	if _, err := kv.Put(ctx, "developers", b); err != nil {
		t.Fatal(err)
	}
	got, err := w.c.svc.groupTargets(ctx)
	if err != nil || len(got) != 1 || got[0] != "r-old" {
		t.Fatalf("group targets %v, %v", got, err)
	}
}

// A file whose chunks are not consecutive in the stream (another file was
// stored while it was) is read window after window; one stored in the
// small chunks of older pushes, with windows in flight; both whole.
func TestCacheReadLayouts(t *testing.T) {
	w := newCacheWorld(t)
	cs := w.c.svc.cache
	ctx := ctxT(t, 30*time.Second)
	put := func(ni *model.NarInfo, r io.Reader, chunk uint32) {
		t.Helper()
		if _, err := cs.obs.Put(ctx, jetstream.ObjectMeta{Name: ni.URL, Opts: &jetstream.ObjectMetaOptions{ChunkSize: chunk}}, fullReader{r}); err != nil {
			t.Fatal(err)
		}
		if err := cs.storeNarInfo(ctx, ni); err != nil {
			t.Fatal(err)
		}
	}
	// a: half stored, then all of b, then the rest of a.
	a, _, dataA := w.fakeNar("a", 6*cacheObjChunk+1)
	b, _, dataB := w.fakeNar("b", 2*cacheObjChunk)
	pr, pw := io.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		put(a, pr, cacheObjChunk)
	}()
	if _, err := pw.Write(dataA[:3*cacheObjChunk]); err != nil {
		t.Fatal(err)
	}
	// The object store holds a chunk once the next read starts: wait
	// until the first three are in the stream.
	poll.Until(t, 10*time.Second, "a's first chunks stored", func() bool {
		si, err := w.c.JetStream().Stream(ctx, subjects.ObjectStream(subjects.ObjectCache))
		return err == nil && si.CachedInfo().State.Msgs >= 3
	})
	put(b, bytes.NewReader(dataB), cacheObjChunk)
	_, _ = pw.Write(dataA[3*cacheObjChunk:])
	_ = pw.Close()
	<-done
	// c: small chunks, many windows.
	c, _, dataC := w.fakeNar("c", 3*cacheWindowBytes+5)
	put(c, bytes.NewReader(dataC), cacheObjChunk)

	srv := w.serve()
	for _, f := range []struct {
		ni   *model.NarInfo
		data []byte
	}{{a, dataA}, {b, dataB}, {c, dataC}} {
		if code, _ := cacheGet(t, srv.URL()+"/"+f.ni.HashPart()+".narinfo"); code != 200 {
			t.Fatalf("narinfo of %s: %d", f.ni.StorePath, code)
		}
		if code, got := cacheGet(t, srv.URL()+"/"+f.ni.URL); code != 200 || !bytes.Equal(got, f.data) {
			t.Fatalf("%s: %d, %d bytes (want %d)", f.ni.StorePath, code, len(got), len(f.data))
		}
	}
	if srv.Refused() != nil {
		t.Fatal(srv.Refused())
	}
	// a's first window names no layout; c's does.
	for _, x := range []struct {
		ni     *model.NarInfo
		layout bool
	}{{a, false}, {c, true}} {
		msgs, err := w.deviceRead([]byte(`{"nar":"` + x.ni.URL + `"}`))
		if err != nil {
			t.Fatal(err)
		}
		if got := msgs[0].Header.Get(subjects.HeaderCacheFirst) != ""; got != x.layout {
			t.Fatalf("%s: layout named %v, want %v", x.ni.StorePath, got, x.layout)
		}
	}
}

// TestCacheWindowBudget: a device asking for NAR windows far faster than
// any fetch does, into an inbox it never reads (the hub sends a window
// whether or not anyone listens), is held to its window budget: the rest
// are refused with 429 before any work is done.
func TestCacheWindowBudget(t *testing.T) {
	w := newCacheWorld(t)
	ni, raw, _ := w.fakeNar("budget", 64<<10)
	w.mustPush(raw)
	id := w.dev.PublicKey()
	inbox := subjects.DeviceInboxPrefix(subjects.DefaultSite, id)
	var refused atomic.Int64
	sub, err := w.nc.Subscribe(inbox+".status.*", func(m *nats.Msg) {
		if m.Header.Get(subjects.HeaderCacheStatus) == "429" {
			refused.Add(1)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	const n = 1000
	start := time.Now()
	for i := range n {
		// Each read's reply goes to an inbox of its own; only refusals
		// are listened to (.status.*): the windows go unread.
		reply := fmt.Sprintf("%s.status.%d", inbox, i)
		if err := w.nc.PublishRequest(subjects.CacheGetFor(id), reply, []byte(`{"nar":"`+ni.URL+`"}`)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	// At most the burst, plus what the rate refilled while the requests
	// were sent, plus slack for the time they took to be served.
	served := cacheWindowBurst + int64(cacheWindowRate*(elapsed.Seconds()+2))
	poll.Telling(t, 20*time.Second, "the reads past the budget refused", func() (bool, string) {
		return n-refused.Load() <= served, fmt.Sprintf("%d of %d refused, at most %d may be served", refused.Load(), n, served)
	})
}
