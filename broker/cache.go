package broker

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"fleet/model"
	"fleet/subjects"
)

// The fleet's binary cache: NAR files in the object store fleet_cache and
// narinfos in the KV bucket fleet_narinfo (key: store path hash), both in
// CORE like every other bucket.
//
// Writes come only through the admin API: cache-put takes a narinfo
// (parsed, checked and stored re-serialised, never as given), then the NAR
// file in chunks sent to this coordinator under a random upload ID that
// only the admin's own inbox heard. The file's hash and size are checked
// against the narinfo before the narinfo is written, and a push cut off
// half way leaves no narinfo (the object store purges the partial file).
//
// Devices ask the coordinator, never JetStream. A device sends
// fleet.cache.<dev> (its template allows only its own) asking for one
// narinfo or one window of a NAR file; the coordinator checks it like
// every device request (a known, active device; a reply in its own inbox;
// its own rate limit; a small request naming a narinfo key or a
// nar/<hash> file). A narinfo it answers itself. For a window it sends a
// header (the object, its size, its layout) and then has the server send
// the chunks straight into the checked inbox: one batched direct get,
// filtered to the file's chunks, sent through FLEET's import of direct
// gets on the object store's stream (subjects.CacheDirect), which only
// the coordinator's own users may send. Devices get no export of their
// own because a direct-get request body can address any message of the
// stream and could not be rate-limited or counted per device or site;
// the coordinator keeps that, and the bytes skip its connections.
// Through a site's leaf the same subjects cross like every other device
// request; a site with a copy of the cache is read there first
// (sitecache.go).

const (
	// cacheObjChunk is the object store's chunk of files pushed when the
	// server's max payload is small, and of files pushed before chunks
	// were sized to it (objChunk); one chunk is one device reply message.
	cacheObjChunk = 128 << 10
	// cacheChunkRoom is what a chunk leaves of the max payload for the
	// headers of a device reply.
	cacheChunkRoom = 4 << 10
	// cacheWindowBytes is what one device read returns (in whole chunks):
	// a device keeps a few windows in flight, and that is what a slow
	// device leaves unread.
	cacheWindowBytes = 4 << 20
	// cacheWindow is a window's chunks at cacheObjChunk.
	cacheWindow = cacheWindowBytes / cacheObjChunk
	// cacheUploadChunk is the largest upload chunk an admin may send.
	cacheUploadChunk = 512 << 10
	// cacheUploadIdle ends an upload no chunk arrived for.
	cacheUploadIdle = time.Minute
	// cacheMaxUploads bounds the uploads one coordinator runs at once.
	cacheMaxUploads = 32
	// cacheReadMax bounds a device's read request.
	cacheReadMax = 512
	// A device fetching a system closure reads a narinfo and a few
	// windows per store path: thousands, in a burst. Its own bucket, so
	// the reports' tighter one is not spent.
	cacheReadRate  = 400.0
	cacheReadBurst = 4000
	// A NAR window is one request and 4 MiB of work for the hub, sent
	// whether or not anyone reads the inbox it goes to: windows have
	// budgets of their own, per device (512 MiB/s, above what one fetch
	// takes) and per site (2 GiB/s for the hub's devices, or for one
	// site's, however many the site's link speaks for).
	cacheWindowRate, cacheWindowBurst         = 128.0, 128
	cacheSiteWindowRate, cacheSiteWindowBurst = 512.0, 1024
	// cacheGrace keeps new entries from retention: a push comes before
	// the release that names it.
	cacheGrace = 24 * time.Hour
	// cacheKeepNewest releases are always kept.
	cacheKeepNewest = 3
	// cacheGCEvery is the period of the retention pass.
	cacheGCEvery = time.Hour
)

// cacheStore is the coordinator's side of the cache.
type cacheStore struct {
	s       *services
	log     zerolog.Logger
	narinfo jetstream.KeyValue
	obs     jetstream.ObjectStore
	// inst names this coordinator in upload subjects.
	inst  string
	index *narIndex

	mu      sync.Mutex
	uploads map[string]*cacheUpload
	busy    map[string]bool // NAR files being uploaded
	// layouts remembers where files' chunks are (layoutOf).
	layouts map[string]objLayout

	// idle and grace are cacheUploadIdle and cacheGrace (tests shorten
	// them; under mu).
	idle, grace time.Duration

	limiter *rateLimiter
	// windows and siteWindows budget NAR windows by device and by site.
	windows, siteWindows *rateLimiter
	requests             *prometheus.CounterVec
	sent                 *prometheus.CounterVec
	// fetchedBytes and fetchedPaths are what devices' applies say they
	// read, by site and source (the site's copy or the hub's cache).
	fetchedBytes, fetchedPaths *prometheus.CounterVec
	// siteKick asks siteLoop to check the sites' mirrors now.
	siteKick chan struct{}
	siteDone chan struct{}
	// links are the coordinator's connections to sites' link accounts
	// (siteConn).
	linkMu sync.Mutex
	links  map[string]*siteLinkConn
	gcMu   sync.Mutex
	lastGC *model.CacheGCResult
	cancel context.CancelFunc
	done   chan struct{}
}

// narEntry is what the cache keeps in memory of one narinfo.
type narEntry struct {
	url     string
	size    int64
	refs    []string // store path hashes
	sigs    []string
	created time.Time
}

// narIndex follows fleet_narinfo: which store paths the cache has, their
// files and references, without a bucket read per question.
type narIndex struct {
	mu    sync.RWMutex
	ready chan struct{}
	m     map[string]*narEntry
}

// startCache opens (creating when needed) the cache's bucket and object
// store, follows the narinfos and subscribes the upload and device
// handlers.
func (s *services) startCache(ctx context.Context) error {
	cs := &cacheStore{s: s, log: s.log.With().Str("component", "cache").Logger(),
		uploads: map[string]*cacheUpload{}, busy: map[string]bool{}, layouts: map[string]objLayout{},
		index:       &narIndex{ready: make(chan struct{}), m: map[string]*narEntry{}},
		limiter:     newRateLimiter(cacheReadRate, cacheReadBurst, s.now),
		windows:     newRateLimiter(cacheWindowRate, cacheWindowBurst, s.now),
		siteWindows: newRateLimiter(cacheSiteWindowRate, cacheSiteWindowBurst, s.now),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleet_cache_requests_total",
			Help: "Device reads of the binary cache by site, kind (narinfo; nar: one window of a NAR file) and result (hit, miss, error).",
		}, []string{"site", "kind", "result"}),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleet_cache_sent_bytes_total",
			Help: "NAR bytes the binary cache sent devices at the coordinator's request, by site (a site's own copy is not counted).",
		}, []string{"site"}),
		fetchedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleet_cache_fetched_bytes_total",
			Help: "NAR bytes devices' applies read from the fleet cache, by the device's site and source (site: the site's own copy; hub: the hub's cache), as the devices report them in their results.",
		}, []string{"site", "source"}),
		fetchedPaths: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fleet_cache_fetched_paths_total",
			Help: "Store paths (narinfos) devices' applies read from the fleet cache, by the device's site and source (site, hub), as the devices report them.",
		}, []string{"site", "source"}),
		done: make(chan struct{}), idle: cacheUploadIdle, grace: cacheGrace, siteKick: make(chan struct{}, 1), siteDone: make(chan struct{}),
	}
	var id [8]byte
	_, _ = rand.Read(id[:])
	cs.inst = hex.EncodeToString(id[:])
	var err error
	// Both are made with the other streams and buckets (ensureStreams).
	if cs.narinfo, err = s.c.js.KeyValue(ctx, subjects.BucketNarInfo); err != nil {
		return fmt.Errorf("bucket %s: %w", subjects.BucketNarInfo, err)
	}
	if cs.obs, err = s.c.js.ObjectStore(ctx, subjects.ObjectCache); err != nil {
		return fmt.Errorf("object store %s: %w", subjects.ObjectCache, err)
	}
	wctx, cancel := context.WithCancel(context.Background())
	cs.cancel = cancel
	if err := cs.watch(wctx); err != nil {
		cancel()
		return err
	}
	sub, err := s.c.fc.Subscribe(subjects.CacheChunks(cs.inst), cs.onChunk)
	if err == nil {
		err = sub.SetPendingLimits(-1, 64<<20)
	}
	if err != nil {
		cancel()
		return fmt.Errorf("subscribe cache uploads: %w", err)
	}
	s.subs = append(s.subs, sub)
	if err := s.subscribeLanes(subjects.AllCacheGet, false, s.pooled(cs.onRead)); err != nil {
		cancel()
		return err
	}
	s.cache = cs
	go cs.gcLoop(wctx)
	go cs.siteLoop(wctx, siteMirrorEvery)
	return nil
}

// objChunk is the chunk files are stored in: as large as a device reply
// may be (fewer, larger messages are what makes a read fast), never
// smaller than cacheObjChunk.
func (cs *cacheStore) objChunk() uint32 {
	return uint32(max(cacheObjChunk, min(cs.s.c.fc.MaxPayload(), 8<<20)-cacheChunkRoom))
}

// windowChunks is how many chunks of a file one read returns.
func windowChunks(info *jetstream.ObjectInfo) int {
	chunk := cacheObjChunk
	if info.Opts != nil && info.Opts.ChunkSize > 0 {
		chunk = int(info.Opts.ChunkSize)
	}
	return max(1, cacheWindowBytes/chunk)
}

// objChunks is the subject of an object's chunks.
func objChunks(b, nuid string) string { return "$O." + b + ".C." + nuid }

// stop ends the cache's watch, retention loop and uploads.
func (cs *cacheStore) stop() {
	if cs == nil {
		return
	}
	cs.cancel()
	<-cs.done
	<-cs.siteDone
	cs.linkMu.Lock()
	for _, l := range cs.links {
		l.nc.Close()
	}
	cs.links = nil
	cs.linkMu.Unlock()
	cs.mu.Lock()
	for _, u := range cs.uploads {
		u.abort(errors.New("coordinator stopping"))
	}
	cs.mu.Unlock()
}

func (s *services) cacheVerbs() []apiVerb {
	return []apiVerb{
		{subjects.VerbCacheQuery, false, subjects.RoleViewer, s.cacheQuery},
		{subjects.VerbCacheList, false, subjects.RoleViewer, s.cacheList},
		{subjects.VerbCachePut, true, subjects.RoleOperator, s.cachePut},
		{subjects.VerbCacheGC, true, subjects.RoleOperator, s.cacheGC},
	}
}

// watch follows the narinfo bucket into the index.
func (cs *cacheStore) watch(ctx context.Context) error {
	w, err := cs.narinfo.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("watch %s: %w", subjects.BucketNarInfo, err)
	}
	go followKV(ctx, w, func(e jetstream.KeyValueEntry) { cs.index.apply(e, cs.log) })
	return nil
}

func (x *narIndex) apply(e jetstream.KeyValueEntry, log zerolog.Logger) {
	if e == nil {
		select {
		case <-x.ready:
		default:
			close(x.ready)
		}
		return
	}
	if e.Operation() != jetstream.KeyValuePut {
		x.mu.Lock()
		delete(x.m, e.Key())
		x.mu.Unlock()
		return
	}
	ni, err := model.ParseNarInfo(e.Value())
	if err != nil {
		log.Warn().Err(err).Str("key", e.Key()).Msg("stored narinfo does not parse")
		return
	}
	x.put(e.Key(), ni, e.Created())
}

// put records narinfo ni under key (the coordinator that writes one knows
// it before its watch tells it).
func (x *narIndex) put(key string, ni *model.NarInfo, created time.Time) {
	refs := make([]string, 0, len(ni.References))
	for _, r := range ni.References {
		refs = append(refs, r[:32])
	}
	x.mu.Lock()
	x.m[key] = &narEntry{url: ni.URL, size: ni.FileSize, refs: refs, sigs: ni.SigKeys(), created: created}
	x.mu.Unlock()
}

// wait returns once the index holds what the bucket held at start.
func (x *narIndex) wait(ctx context.Context) error {
	select {
	case <-x.ready:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("binary cache index: %w", ctx.Err())
	}
}

func (x *narIndex) get(key string) *narEntry {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return x.m[key]
}

func (x *narIndex) remove(key string) {
	x.mu.Lock()
	delete(x.m, key)
	x.mu.Unlock()
}

// snapshot copies the index.
func (x *narIndex) snapshot() map[string]*narEntry {
	x.mu.RLock()
	defer x.mu.RUnlock()
	out := make(map[string]*narEntry, len(x.m))
	for k, v := range x.m {
		out[k] = v
	}
	return out
}

// cacheQuery answers which of the asked store paths the cache lacks.
func (s *services) cacheQuery(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.CacheQuery
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	if len(a.Hashes) > model.MaxCacheQuery {
		return nil, badRequest("%d store paths in one query, at most %d", len(a.Hashes), model.MaxCacheQuery)
	}
	if err := s.cache.index.wait(ctx); err != nil {
		return nil, err
	}
	r := model.CacheQueryReply{Missing: []string{}, Signed: map[string][]string{}}
	for _, h := range a.Hashes {
		if err := model.CheckStoreHash(h); err != nil {
			return nil, badRequest("%v", err)
		}
		if e := s.cache.index.get(h); e != nil {
			r.Signed[h] = e.sigs
		} else {
			r.Missing = append(r.Missing, h)
		}
	}
	return r, nil
}

// cachePut takes a narinfo: stored at once when the cache has its NAR
// file, otherwise an upload of the file begins.
func (s *services) cachePut(ctx context.Context, who *model.Admin, raw json.RawMessage) (any, error) {
	cs := s.cache
	var a model.CachePut
	if err := decodeArgs(raw, &a); err != nil {
		return nil, err
	}
	ni, err := model.ParseNarInfo([]byte(a.NarInfo))
	if err != nil {
		return nil, badRequest("%v", err)
	}
	if len(ni.Sigs) == 0 {
		return nil, badRequest("narinfo of %s is not signed: sign the closure (nix store sign, or secret-key-files) before pushing; devices refuse unsigned paths", ni.StorePath)
	}
	r := model.CachePutReply{StorePath: ni.StorePath}
	key := ni.HashPart()
	if _, err := cs.narinfo.Get(ctx, key); err == nil {
		r.Present = true
		return r, nil
	} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, fmt.Errorf("read narinfo %s: %w", key, err)
	}
	info, err := cs.obs.GetInfo(ctx, ni.URL)
	switch {
	case err == nil && fileMatches(info, ni):
		// Another store path's push brought the same file.
		if err := cs.storeNarInfo(ctx, ni); err != nil {
			return nil, err
		}
		r.Present = true
		return r, nil
	case err != nil && !errors.Is(err, jetstream.ErrObjectNotFound):
		return nil, fmt.Errorf("read NAR file %s: %w", ni.URL, err)
	}
	u, err := cs.newUpload(who.Key, ni)
	if err != nil {
		return nil, err
	}
	r.Subject, r.Chunk = subjects.CacheChunk(cs.inst, u.id), cacheUploadChunk
	return r, nil
}

// fileMatches reports whether the stored object is the narinfo's file.
func fileMatches(info *jetstream.ObjectInfo, ni *model.NarInfo) bool {
	sum, err := model.ParseSHA256(ni.FileHash)
	return err == nil && !info.Deleted && int64(info.Size) == ni.FileSize &&
		info.Digest == "SHA-256="+base64.URLEncoding.EncodeToString(sum)
}

// storeNarInfo writes ni (as the cache writes it, not as it was given).
func (cs *cacheStore) storeNarInfo(ctx context.Context, ni *model.NarInfo) error {
	_, err := cs.narinfo.Create(ctx, ni.HashPart(), []byte(ni.String()))
	if errors.Is(err, jetstream.ErrKeyExists) {
		return nil // another push of the same path won
	}
	if err != nil {
		return fmt.Errorf("store narinfo of %s: %w", ni.StorePath, err)
	}
	cs.index.put(ni.HashPart(), ni, time.Now())
	return nil
}

// cacheUpload is one NAR file coming in.
type cacheUpload struct {
	cs    *cacheStore
	id    string
	admin string
	ni    *model.NarInfo
	ch    chan *nats.Msg
	stop  chan error
	once  sync.Once
	idle  time.Duration
}

func (cs *cacheStore) newUpload(admin string, ni *model.NarInfo) (*cacheUpload, error) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.busy[ni.URL] {
		return nil, conflict("%s of %s is being pushed by another upload: try again when it ends", ni.URL, ni.StorePath)
	}
	if len(cs.uploads) >= cacheMaxUploads {
		return nil, conflict("the coordinator takes %d uploads at once: try again shortly", cacheMaxUploads)
	}
	var id [16]byte
	_, _ = rand.Read(id[:])
	u := &cacheUpload{cs: cs, id: hex.EncodeToString(id[:]), admin: admin, ni: ni, ch: make(chan *nats.Msg, 4), stop: make(chan error, 1), idle: cs.idle}
	cs.uploads[u.id] = u
	cs.busy[ni.URL] = true
	go u.run()
	return u, nil
}

func (u *cacheUpload) abort(err error) {
	u.once.Do(func() { u.stop <- err })
}

// onChunk takes a chunk of an upload from the admin who began it (its
// reply inbox) to the upload's goroutine.
func (cs *cacheStore) onChunk(m *nats.Msg) {
	id := m.Subject[strings.LastIndexByte(m.Subject, '.')+1:]
	cs.mu.Lock()
	u := cs.uploads[id]
	cs.mu.Unlock()
	key, ok := subjects.AdminInboxKey(m.Reply)
	if u == nil || !ok || key != u.admin {
		cs.s.dropped.WithLabelValues("cache-upload", dropReply).Inc()
		return
	}
	select {
	case u.ch <- m:
	default:
		cs.s.reply(m, model.CacheChunkReply{Error: "chunk sent before the previous one was answered: send one chunk at a time"})
	}
}

type putResult struct {
	info *jetstream.ObjectInfo
	err  error
}

// run receives the upload's chunks into the object store and, once the
// last checked out against the narinfo, writes the narinfo. Any failure
// (a chunk out of order or past the size, silence, a hash that does not
// match) removes what was stored and writes no narinfo.
func (u *cacheUpload) run() {
	cs, ni := u.cs, u.ni
	defer func() {
		cs.mu.Lock()
		delete(cs.uploads, u.id)
		delete(cs.busy, ni.URL)
		cs.mu.Unlock()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Hour)
	defer cancel()
	pr, pw := io.Pipe()
	putDone := make(chan putResult, 1)
	go func() {
		info, err := cs.obs.Put(ctx, jetstream.ObjectMeta{Name: ni.URL, Opts: &jetstream.ObjectMetaOptions{ChunkSize: cs.objChunk()}}, fullReader{pr})
		// A writer waiting on a store that failed is let go.
		_ = pr.CloseWithError(fmt.Errorf("object store: %v", err))
		putDone <- putResult{info, err}
	}()
	h := sha256.New()
	var got int64
	idle := time.NewTimer(u.idle)
	defer idle.Stop()
	fail := func(m *nats.Msg, err error) {
		_ = pw.CloseWithError(err) // the object store purges what it took
		<-putDone
		cs.log.Warn().Err(err).Str("store_path", ni.StorePath).Msg("cache upload failed; nothing stored")
		if m != nil {
			cs.s.reply(m, model.CacheChunkReply{Received: got, Error: err.Error()})
		}
	}
	for {
		select {
		case err := <-u.stop:
			fail(nil, err)
			return
		case <-idle.C:
			fail(nil, fmt.Errorf("no chunk for %s", u.idle))
			return
		case r := <-putDone:
			putDone <- r
			fail(nil, fmt.Errorf("object store: %v", r.err))
			return
		case m := <-u.ch:
			idle.Reset(u.idle)
			off, err := strconv.ParseInt(m.Header.Get(subjects.HeaderCacheOffset), 10, 64)
			switch {
			case err != nil || off != got:
				fail(m, fmt.Errorf("chunk at offset %q, expected %d", m.Header.Get(subjects.HeaderCacheOffset), got))
				return
			case len(m.Data) > cacheUploadChunk:
				fail(m, fmt.Errorf("chunk of %d bytes, at most %d", len(m.Data), cacheUploadChunk))
				return
			case got+int64(len(m.Data)) > ni.FileSize:
				fail(m, fmt.Errorf("%s is more than the narinfo's FileSize %d", ni.URL, ni.FileSize))
				return
			}
			h.Write(m.Data)
			if _, err := pw.Write(m.Data); err != nil {
				fail(m, err)
				return
			}
			got += int64(len(m.Data))
			if m.Header.Get(subjects.HeaderCacheEnd) == "" {
				cs.s.reply(m, model.CacheChunkReply{Received: got})
				continue
			}
			if err := u.finish(ctx, pw, putDone, h, got); err != nil {
				cs.log.Warn().Err(err).Str("store_path", ni.StorePath).Msg("cache upload refused; nothing stored")
				cs.s.reply(m, model.CacheChunkReply{Received: got, Error: err.Error()})
				return
			}
			cs.log.Info().Str("store_path", ni.StorePath).Int64("bytes", got).Msg("cache: stored")
			cs.s.reply(m, model.CacheChunkReply{Received: got, Stored: true})
			return
		}
	}
}

// fullReader fills every read: the object store cuts a chunk at each
// read, and a pipe's read returns one upload chunk, smaller than a stored
// chunk.
type fullReader struct{ r io.Reader }

func (f fullReader) Read(p []byte) (int, error) {
	n, err := io.ReadFull(f.r, p)
	if errors.Is(err, io.ErrUnexpectedEOF) {
		err = nil // the last, short chunk; io.EOF comes next
	}
	return n, err
}

// finish ends the file and checks it against the narinfo before the
// narinfo is written; a file that does not match is removed.
func (u *cacheUpload) finish(ctx context.Context, pw *io.PipeWriter, putDone <-chan putResult, h hash.Hash, got int64) error {
	cs, ni := u.cs, u.ni
	_ = pw.Close()
	r := <-putDone
	if r.err != nil {
		return fmt.Errorf("store %s: %w", ni.URL, r.err)
	}
	want, _ := model.ParseSHA256(ni.FileHash)
	sum := h.Sum(nil)
	if got != ni.FileSize || int64(r.info.Size) != ni.FileSize || string(sum) != string(want) {
		if err := cs.obs.Delete(ctx, ni.URL); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
			cs.log.Error().Err(err).Str("url", ni.URL).Msg("cache: removing a file that does not match its narinfo failed (retention removes it)")
		}
		return fmt.Errorf("%s does not match its narinfo: %d bytes with hash %s, the narinfo says %d bytes with hash %s: refused",
			ni.URL, got, model.SHA256Nix(sum), ni.FileSize, ni.FileHash)
	}
	return cs.storeNarInfo(ctx, ni)
}

// onRead answers a device's read of the cache, only into its own inbox:
// a narinfo, or one window of a NAR file.
func (cs *cacheStore) onRead(l *lane, m *nats.Msg) {
	s := cs.s
	id, ok := subjects.DeviceFromRequest(subjects.CacheGet, m.Subject)
	if m.Reply == "" {
		s.drop("cache", dropInvalid, m)
		return
	}
	d := s.deviceFor("cache", m, id, ok)
	if d == nil {
		return
	}
	site := siteOf(d)
	var q model.CacheRead
	if len(m.Data) > cacheReadMax || json.Unmarshal(m.Data, &q) != nil || (q.NarInfo == "") == (q.Nar == "") {
		s.drop("cache", dropInvalid, m)
		cs.readError(l, m, 400, "a cache read names one narinfo (store path hash) or one NAR file, in at most 512 bytes of JSON")
		return
	}
	if !cs.limiter.allow(id) {
		s.drop("cache", dropRate, m)
		cs.readError(l, m, 429, "too many cache reads: slow down")
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if q.NarInfo != "" {
		cs.readNarInfo(ctx, l, m, site, q.NarInfo)
		return
	}
	cs.readNar(ctx, l, m, id, site, &q)
}

func (cs *cacheStore) readError(l *lane, m *nats.Msg, status int, msg string) {
	r := nats.NewMsg(m.Reply)
	r.Header.Set(subjects.HeaderCacheStatus, strconv.Itoa(status))
	r.Header.Set(subjects.HeaderCacheError, msg)
	_ = l.fc.PublishMsg(r)
}

func (cs *cacheStore) count(site, kind, result string) {
	cs.requests.WithLabelValues(site, kind, result).Inc()
}

// countFetched counts what a device at site says its apply read: the
// hub sees none of what a site's copy serves, so this is where the site's
// hits show.
func (cs *cacheStore) countFetched(site string, f *model.CacheFetch) {
	for _, c := range []struct {
		source string
		paths  int
		bytes  int64
	}{{"site", f.SiteNarInfos, f.SiteBytes}, {"hub", f.HubNarInfos, f.HubBytes}} {
		if c.paths > 0 || c.bytes > 0 {
			cs.fetchedPaths.WithLabelValues(site, c.source).Add(float64(c.paths))
			cs.fetchedBytes.WithLabelValues(site, c.source).Add(float64(c.bytes))
		}
	}
}

func (cs *cacheStore) readNarInfo(ctx context.Context, l *lane, m *nats.Msg, site, key string) {
	if model.CheckStoreHash(key) != nil {
		cs.s.drop("cache", dropInvalid, m)
		cs.readError(l, m, 400, "not a store path hash")
		return
	}
	e, err := cs.narinfo.Get(ctx, key)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		cs.count(site, "narinfo", "miss")
		cs.readError(l, m, 404, "no narinfo for "+key)
		return
	case err != nil:
		cs.count(site, "narinfo", "error")
		cs.readError(l, m, 500, "read narinfo: "+err.Error())
		return
	}
	cs.count(site, "narinfo", "hit")
	_ = l.fc.Publish(m.Reply, e.Value())
}

// readNar has one window of a NAR file sent to the device: up to
// windowChunks chunks after the stream sequence q.After. The coordinator
// checks the read and sends a header (the object, its size and, when its
// chunks are consecutive in the stream, its layout: then the device knows
// every window's cursor and asks for several at once); the chunks
// themselves the server sends straight into the device's inbox, as the
// replies of one batched direct get the coordinator makes through FLEET's
// import of it (subjects.CacheDirect, which no role may send): the bytes
// do not pass through the coordinator. Each read stays one request,
// checked and rate-limited like any other, answered by any coordinator.
func (cs *cacheStore) readNar(ctx context.Context, l *lane, m *nats.Msg, id, site string, q *model.CacheRead) {
	if model.CheckNarURL(q.Nar) != nil || len(q.Object) > 64 || strings.ContainsAny(q.Object, ".*> \t\r\n") {
		cs.s.drop("cache", dropInvalid, m)
		cs.readError(l, m, 400, "not a NAR file name (nar/<hash>.nar[.xz|.zst|.bz2])")
		return
	}
	if !cs.windows.allow(id) || !cs.siteWindows.allow(site) {
		cs.s.drop("cache", dropRate, m)
		cs.readError(l, m, 429, "too many NAR windows: slow down")
		return
	}
	info, err := cs.obs.GetInfo(ctx, q.Nar)
	switch {
	case errors.Is(err, jetstream.ErrObjectNotFound) || (err == nil && info.Deleted):
		cs.count(site, "nar", "miss")
		cs.readError(l, m, 404, "no NAR file "+q.Nar)
		return
	case err != nil:
		cs.count(site, "nar", "error")
		cs.readError(l, m, 500, "read NAR file: "+err.Error())
		return
	case q.Object != "" && q.Object != info.NUID:
		// Replaced while the device read it: it starts again.
		cs.count(site, "nar", "miss")
		cs.readError(l, m, 409, "NAR file "+q.Nar+" changed while it was read")
		return
	}
	chunks := objChunks(subjects.ObjectCache, info.NUID)
	win := windowChunks(info)
	lay := cs.layoutOf(ctx, l, info, chunks)
	h := nats.NewMsg(m.Reply)
	h.Header.Set(subjects.HeaderCacheObject, info.NUID)
	h.Header.Set(subjects.HeaderCacheSize, strconv.FormatUint(info.Size, 10))
	h.Header.Set(subjects.HeaderCacheWindow, strconv.Itoa(win))
	if lay.first != 0 {
		h.Header.Set(subjects.HeaderCacheFirst, strconv.FormatUint(lay.first, 10))
		h.Header.Set(subjects.HeaderCacheChunks, strconv.FormatUint(uint64(info.Chunks), 10))
	}
	// Only this object's chunks: whatever cursor a device sends, the
	// subject filter keeps the read inside the file it named, and the
	// replies go only to the inbox deviceFor checked.
	req, _ := json.Marshal(map[string]any{"seq": q.After + 1, "next_by_subj": chunks, "batch": win})
	if err := l.fc.PublishMsg(h); err == nil {
		err = l.fc.PublishRequest(subjects.CacheDirect, m.Reply, req)
	}
	if err != nil {
		cs.count(site, "nar", "error")
		cs.readError(l, m, 500, "read NAR chunks: "+err.Error())
		return
	}
	cs.count(site, "nar", "hit")
	cs.sent.WithLabelValues(site).Add(float64(windowBytes(info, lay, q.After, win)))
}

// objLayout is where a file's chunks are in the stream: first is the
// first chunk's sequence when they are consecutive, else 0.
type objLayout struct{ first uint64 }

// cacheLayouts bounds the layouts a coordinator remembers.
const cacheLayouts = 4096

// layoutOf finds (once per object) whether its chunks are consecutive in
// the stream: its first and last chunks' sequences, read with two direct
// gets.
func (cs *cacheStore) layoutOf(ctx context.Context, l *lane, info *jetstream.ObjectInfo, chunks string) objLayout {
	cs.mu.Lock()
	lay, ok := cs.layouts[info.NUID]
	cs.mu.Unlock()
	if ok || info.Chunks == 0 {
		return lay
	}
	first := cs.chunkSeq(ctx, l, `{"seq":1,"next_by_subj":"`+chunks+`"}`, "")
	last := cs.chunkSeq(ctx, l, "", "."+chunks)
	if first != 0 && last >= first && last-first+1 == uint64(info.Chunks) {
		lay.first = first
	}
	cs.mu.Lock()
	if len(cs.layouts) >= cacheLayouts {
		clear(cs.layouts)
	}
	cs.layouts[info.NUID] = lay
	cs.mu.Unlock()
	return lay
}

// windowBytes is how many bytes of the file the window after sequence
// after holds (exact for consecutive chunks, at most a window otherwise).
func windowBytes(info *jetstream.ObjectInfo, lay objLayout, after uint64, win int) int64 {
	chunk := int64(cacheObjChunk)
	if info.Opts != nil && info.Opts.ChunkSize > 0 {
		chunk = int64(info.Opts.ChunkSize)
	}
	size, n := int64(info.Size), int64(info.Chunks)
	if lay.first == 0 {
		return min(int64(win)*chunk, size)
	}
	idx := int64(0)
	if after >= lay.first {
		idx = int64(after-lay.first) + 1
	}
	if idx >= n {
		return 0
	}
	end := min(idx+int64(win), n)
	b := (end - idx) * chunk
	if end == n {
		b -= n*chunk - size // the last chunk is short
	}
	return max(b, 0)
}

// chunkSeq is the stream sequence of the message a direct get finds
// (body, or subj appended to the API subject for the last of a subject),
// 0 when none.
func (cs *cacheStore) chunkSeq(ctx context.Context, l *lane, body, subj string) uint64 {
	r, err := l.nc.RequestWithContext(ctx, subjects.JSAPIPrefix("")+".DIRECT.GET."+subjects.ObjectStream(subjects.ObjectCache)+subj, []byte(body))
	if err != nil || r.Header.Get("Status") != "" {
		return 0
	}
	seq, _ := strconv.ParseUint(r.Header.Get(jetstream.SequenceHeader), 10, 64)
	return seq
}
