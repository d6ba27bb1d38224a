package agent

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"fleet/model"
	"fleet/subjects"
)

// The fleet cache on the device: for the length of one fetch, the agent
// serves a Nix HTTP binary cache on loopback (http://127.0.0.1:<port>)
// whose narinfos and NAR files it reads from the coordinator over its own
// NATS connection; `nix copy --from` then fetches from it as from any
// cache, and Nix checks every signature against the host's
// trusted-public-keys. The agent checks each NAR file against the hash
// and size its narinfo names before Nix gets its last bytes: a file that
// does not match is cut off, and the fetch fails as refused.

// ErrCacheRefused is a fetch from the fleet cache that got a NAR file
// that does not match its narinfo: retrying fetches the same bytes.
var ErrCacheRefused = errors.New("the fleet cache served a NAR file that does not match its narinfo")

// cacheNarStreams bounds the NAR files read at once (each holds a
// subscription; a device has few).
const cacheNarStreams = 4

// cacheWait bounds the wait for one answer of the coordinator.
const cacheWait = 30 * time.Second

// CacheServer is a loopback binary cache backed by the fleet cache.
type CacheServer struct {
	nc   *nats.Conn
	subj string
	log  zerolog.Logger
	ln   net.Listener
	srv  *http.Server
	sem  chan struct{}

	mu       sync.Mutex
	files    map[string]*model.NarInfo // NAR file → the narinfo that named it
	refused  error
	narBytes int64
	// noSite: the site's copy did not answer (or is not to be asked); the
	// rest of the fetch reads the hub's. siteFailed: a file read from the
	// site's copy was cut off (it did not match, or ended short).
	noSite, siteFailed bool
	// siteNarInfos and hubNarInfos count where narinfos came from,
	// siteBytes the NAR bytes of narBytes read from the site's copy.
	siteNarInfos, hubNarInfos int
	siteBytes                 int64
}

// ServeFleetCache starts a loopback binary cache for device id, read over
// nc. Close stops it.
func ServeFleetCache(nc *nats.Conn, id string, log zerolog.Logger) (*CacheServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("fleet cache: listen on loopback: %w", err)
	}
	cs := &CacheServer{nc: nc, subj: subjects.CacheGetFor(id), log: log, ln: ln, sem: make(chan struct{}, cacheNarStreams),
		files: map[string]*model.NarInfo{}}
	cs.srv = &http.Server{Handler: cs, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = cs.srv.Serve(ln) }()
	return cs, nil
}

// SkipSite has the server read the hub's cache only, not the site's copy.
func (cs *CacheServer) SkipSite() {
	cs.mu.Lock()
	cs.noSite = true
	cs.mu.Unlock()
}

// SiteFailed reports whether a file read from the site's copy was cut off:
// the hub's cache may still have it right.
func (cs *CacheServer) SiteFailed() bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.siteFailed
}

// URL is the substituter to pass to nix copy --from.
func (cs *CacheServer) URL() string { return "http://" + cs.ln.Addr().String() }

// Close stops the server; requests in flight end.
func (cs *CacheServer) Close() error { return cs.srv.Close() }

// Refused is ErrCacheRefused (wrapped, naming the file) when a NAR file
// did not match its narinfo.
func (cs *CacheServer) Refused() error {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.refused
}

// NarInfos is how many narinfos came from the site's copy and how many
// from the hub's cache.
func (cs *CacheServer) NarInfos() (site, hub int) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.siteNarInfos, cs.hubNarInfos
}

// Fetched is what the server passed to Nix, by source.
func (cs *CacheServer) Fetched() model.CacheFetch {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return model.CacheFetch{SiteNarInfos: cs.siteNarInfos, HubNarInfos: cs.hubNarInfos, SiteBytes: cs.siteBytes, HubBytes: cs.narBytes - cs.siteBytes}
}

// NarBytes is how many NAR file bytes the server passed to Nix.
func (cs *CacheServer) NarBytes() int64 {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.narBytes
}

func (cs *CacheServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		http.Error(w, "read only", http.StatusMethodNotAllowed)
		return
	}
	p := strings.TrimPrefix(r.URL.Path, "/")
	switch {
	case p == "nix-cache-info":
		w.Header().Set("Content-Type", "text/x-nix-cache-info")
		_, _ = w.Write([]byte("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"))
	case strings.HasSuffix(p, ".narinfo") && !strings.Contains(p, "/"):
		cs.serveNarInfo(w, r, strings.TrimSuffix(p, ".narinfo"))
	case strings.HasPrefix(p, "nar/"):
		cs.serveNar(w, r, p)
	default:
		http.NotFound(w, r)
	}
}

// cacheError is an answer of the coordinator that is not the thing asked.
type cacheError struct {
	status int
	msg    string
}

func (e *cacheError) Error() string { return fmt.Sprintf("fleet cache: %s (%d)", e.msg, e.status) }

func replyError(m *nats.Msg) error {
	st := m.Header.Get(subjects.HeaderCacheStatus)
	if st == "" {
		return nil
	}
	code, _ := strconv.Atoi(st)
	return &cacheError{status: code, msg: m.Header.Get(subjects.HeaderCacheError)}
}

// httpStatus maps a failed read to what Nix understands: 404 is "not in
// this cache", everything else a server error it may retry.
func httpStatus(err error) int {
	var ce *cacheError
	if errors.As(err, &ce) && ce.status == http.StatusNotFound {
		return http.StatusNotFound
	}
	return http.StatusBadGateway
}

func (cs *CacheServer) serveNarInfo(w http.ResponseWriter, r *http.Request, key string) {
	if model.CheckStoreHash(key) != nil {
		http.NotFound(w, r)
		return
	}
	if ni, err := cs.siteNarInfo(r.Context(), key); err == nil {
		cs.mu.Lock()
		cs.files[ni.URL] = ni
		cs.siteNarInfos++
		cs.mu.Unlock()
		w.Header().Set("Content-Type", "text/x-nix-narinfo")
		_, _ = w.Write([]byte(ni.String()))
		return
	}
	q, _ := json.Marshal(model.CacheRead{NarInfo: key})
	ctx, cancel := context.WithTimeout(r.Context(), cacheWait)
	defer cancel()
	m, err := cs.nc.RequestWithContext(ctx, cs.subj, q)
	if err == nil {
		err = replyError(m)
	}
	if err != nil {
		cs.log.Debug().Err(err).Str("narinfo", key).Msg("fleet cache")
		http.Error(w, err.Error(), httpStatus(err))
		return
	}
	ni, err := model.ParseNarInfo(m.Data)
	if err != nil || ni.HashPart() != key {
		cs.log.Warn().Err(err).Str("narinfo", key).Msg("fleet cache: the coordinator sent a narinfo that does not parse or names another path")
		http.Error(w, "bad narinfo", http.StatusBadGateway)
		return
	}
	cs.mu.Lock()
	cs.files[ni.URL] = ni
	cs.hubNarInfos++
	cs.mu.Unlock()
	w.Header().Set("Content-Type", "text/x-nix-narinfo")
	_, _ = w.Write([]byte(ni.String()))
}

// serveNar streams a NAR file window by window. The last chunk is held
// back until the whole file's hash and size are checked against the
// narinfo; a file that does not match is cut off (the connection closes
// short of its length), so Nix never gets it whole.
func (cs *CacheServer) serveNar(w http.ResponseWriter, r *http.Request, file string) {
	if model.CheckNarURL(file) != nil {
		http.NotFound(w, r)
		return
	}
	cs.mu.Lock()
	ni, refused := cs.files[file], cs.refused
	cs.mu.Unlock()
	if ni == nil {
		// Nix reads a narinfo before its file: without one, the bytes
		// could not be checked.
		http.NotFound(w, r)
		return
	}
	if refused != nil && strings.Contains(refused.Error(), file) {
		http.Error(w, refused.Error(), http.StatusNotFound)
		return
	}
	if r.Method == http.MethodHead {
		w.Header().Set("Content-Length", strconv.FormatInt(ni.FileSize, 10))
		return
	}
	select {
	case cs.sem <- struct{}{}:
		defer func() { <-cs.sem }()
	case <-r.Context().Done():
		return
	}
	// The site's copy first, when there is one and it has the file; the
	// hub's otherwise.
	var src narSource
	fromSite := false
	if sr, err := cs.openSiteNar(r.Context(), file, ni); err == nil {
		defer sr.close()
		src, fromSite = sr, true
	} else {
		if !errors.Is(err, errNoSite) {
			cs.log.Debug().Err(err).Str("nar", file).Msg("fleet cache: not at the site; reading the hub's")
		}
		rd, err := cs.openHubNar(file)
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		defer rd.close()
		src = rd
	}
	h := sha256.New()
	var got int64
	var held []byte
	started, whole := false, false
	if fromSite {
		defer func() {
			if !whole {
				cs.mu.Lock()
				cs.siteFailed = true
				cs.mu.Unlock()
			}
		}()
	}
	for {
		c, err := src.next(r.Context())
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			cs.log.Debug().Err(err).Str("nar", file).Msg("fleet cache")
			if !started {
				http.Error(w, err.Error(), httpStatus(err))
				return
			}
			panic(http.ErrAbortHandler) // cut off: Nix sees a short file
		}
		if !started {
			if src.fileSize() != ni.FileSize {
				cs.refuse(fmt.Errorf("%w: %s is %d bytes, its narinfo says %d", ErrCacheRefused, file, src.fileSize(), ni.FileSize))
				http.Error(w, "size does not match the narinfo", http.StatusNotFound)
				return
			}
			w.Header().Set("Content-Type", "application/x-nix-nar")
			w.Header().Set("Content-Length", strconv.FormatInt(ni.FileSize, 10))
			w.WriteHeader(http.StatusOK)
			started = true
		}
		if got += int64(len(c)); got > ni.FileSize {
			cs.refuse(fmt.Errorf("%w: %s is longer than its narinfo's %d bytes", ErrCacheRefused, file, ni.FileSize))
			panic(http.ErrAbortHandler)
		}
		h.Write(c)
		if held != nil {
			if _, err := w.Write(held); err != nil {
				return
			}
			cs.addBytes(len(held), fromSite)
		}
		held = c
	}
	if !started {
		// An empty file: its one message says so.
		w.Header().Set("Content-Length", "0")
	}
	want, _ := model.ParseSHA256(ni.FileHash)
	if sum := h.Sum(nil); got != ni.FileSize || string(sum) != string(want) {
		cs.refuse(fmt.Errorf("%w: %s has hash %s and %d bytes, its narinfo says %s and %d", ErrCacheRefused, file,
			model.SHA256Nix(sum), got, ni.FileHash, ni.FileSize))
		panic(http.ErrAbortHandler)
	}
	whole = true
	if held != nil {
		if _, err := w.Write(held); err == nil {
			cs.addBytes(len(held), fromSite)
		}
	}
}

// narSource is where the bytes of one NAR file come from: the hub's
// cache through the coordinator, or the site's copy.
type narSource interface {
	// next returns the file's next bytes, io.EOF after the last.
	next(ctx context.Context) ([]byte, error)
	// fileSize is the size the source says the file has (known once
	// next returned bytes).
	fileSize() int64
	close()
}

// openHubNar starts reading file from the hub's cache.
func (cs *CacheServer) openHubNar(file string) (*narReader, error) {
	inbox := cs.nc.NewInbox()
	sub, err := cs.nc.SubscribeSync(inbox + ".*")
	if err == nil {
		// Bounded by the windows in flight.
		err = sub.SetPendingLimits(-1, -1)
	}
	if err != nil {
		return nil, fmt.Errorf("fleet cache: %w", err)
	}
	rd := &narReader{cs: cs, file: file, sub: sub, inbox: inbox, pending: map[int][]*nats.Msg{}}
	if err := rd.ask(0, 0); err != nil {
		_ = sub.Unsubscribe()
		return nil, err
	}
	return rd, nil
}

func (rd *narReader) fileSize() int64 { return rd.size }
func (rd *narReader) close()          { _ = rd.sub.Unsubscribe() }

func (cs *CacheServer) refuse(err error) {
	cs.log.Error().Err(err).Msg("fleet cache: NAR file refused")
	cs.mu.Lock()
	if cs.refused == nil {
		cs.refused = err
	}
	cs.mu.Unlock()
}

func (cs *CacheServer) addBytes(n int, fromSite bool) {
	cs.mu.Lock()
	cs.narBytes += int64(n)
	if fromSite {
		cs.siteBytes += int64(n)
	}
	cs.mu.Unlock()
}

// cacheDepth is how many windows of one NAR file the agent keeps in
// flight when the file's layout lets it name their cursors: enough to
// hide a round trip and the coordinator's read of the next window behind
// the one being passed to Nix.
const cacheDepth = 4

// narReader reads one NAR file from the hub's cache, a window at a time
// or, when the first window's header names the file's layout, with
// cacheDepth windows in flight. Window k is answered into inbox.k.
type narReader struct {
	cs     *CacheServer
	file   string
	sub    *nats.Subscription
	inbox  string
	object string
	// chunkSubj is the subject of the object's chunks.
	chunkSubj string
	size      int64
	got       int64
	pending   map[int][]*nats.Msg // messages of windows ahead of cur

	// The layout (pipelined): the first chunk's sequence, the chunks and
	// the chunks a window holds; without it, after is the cursor.
	pipelined   bool
	first       uint64
	chunks, per int
	after       uint64
	cur, idx    int // the window being read and its next chunk
	asked       int // windows asked for
	done        bool
}

// ask sends the read of window k, the chunks after sequence after.
func (rd *narReader) ask(k int, after uint64) error {
	q, _ := json.Marshal(model.CacheRead{Nar: rd.file, Object: rd.object, After: after})
	if err := rd.cs.nc.PublishRequest(rd.cs.subj, rd.inbox+"."+strconv.Itoa(k), q); err != nil {
		return fmt.Errorf("fleet cache: ask for %s: %w", rd.file, err)
	}
	rd.asked = k + 1
	return nil
}

// take returns the next message of the current window, keeping those of
// later windows for their turn.
func (rd *narReader) take(ctx context.Context) (*nats.Msg, error) {
	if q := rd.pending[rd.cur]; len(q) > 0 {
		rd.pending[rd.cur] = q[1:]
		return q[0], nil
	}
	ctx, cancel := context.WithTimeout(ctx, cacheWait)
	defer cancel()
	for {
		m, err := rd.sub.NextMsgWithContext(ctx)
		if err != nil {
			return nil, fmt.Errorf("fleet cache: read %s: %w", rd.file, err)
		}
		k, err := strconv.Atoi(m.Subject[strings.LastIndexByte(m.Subject, '.')+1:])
		switch {
		case err != nil || k < rd.cur || k >= rd.asked:
			continue // not a window in flight
		case k == rd.cur:
			return m, nil
		}
		if len(rd.pending[k]) >= rd.per+3 { // a header, the chunks, the end
			return nil, fmt.Errorf("fleet cache: %s: window %d is longer than it may be", rd.file, k)
		}
		rd.pending[k] = append(rd.pending[k], m)
	}
}

// next returns the file's next bytes, io.EOF after the last. A window is
// the coordinator's header, then the chunks of the direct get it made
// for the device, then that get's end (status 204, or 404 past the last
// chunk); every chunk must be of the file the header named and where the
// cursor says.
func (rd *narReader) next(ctx context.Context) ([]byte, error) {
	for !rd.done {
		m, err := rd.take(ctx)
		if err != nil {
			return nil, err
		}
		if err := replyError(m); err != nil {
			return nil, err
		}
		if obj := m.Header.Get(subjects.HeaderCacheObject); obj != "" {
			size, err := strconv.ParseInt(m.Header.Get(subjects.HeaderCacheSize), 10, 64)
			if err != nil || size < 0 || (rd.object != "" && (obj != rd.object || size != rd.size)) {
				return nil, fmt.Errorf("fleet cache: %s: a window of another file", rd.file)
			}
			rd.object, rd.size, rd.chunkSubj = obj, size, "$O."+subjects.ObjectCache+".C."+obj
			if rd.cur == 0 && rd.idx == 0 {
				if err := rd.layout(m); err != nil {
					return nil, err
				}
			}
			continue
		}
		if rd.object == "" {
			return nil, fmt.Errorf("fleet cache: %s: a window that does not say its file", rd.file)
		}
		switch st := m.Header.Get("Status"); st {
		case "":
		case "204", "404":
			if err := rd.endWindow(st); err != nil {
				return nil, err
			}
			continue
		default:
			return nil, fmt.Errorf("fleet cache: %s: status %s %s", rd.file, st, m.Header.Get("Description"))
		}
		seq, err := strconv.ParseUint(m.Header.Get("Nats-Sequence"), 10, 64)
		want := rd.first + uint64(rd.cur*rd.per+rd.idx)
		if err != nil || m.Header.Get("Nats-Subject") != rd.chunkSubj ||
			(rd.pipelined && (seq != want || rd.idx >= rd.per)) || (!rd.pipelined && seq <= rd.after) {
			return nil, fmt.Errorf("fleet cache: %s: a chunk of another file or out of order", rd.file)
		}
		rd.after = seq
		rd.idx++
		if rd.got+int64(len(m.Data)) > rd.size {
			return nil, fmt.Errorf("%w: %s is longer than the %d bytes it said", ErrCacheRefused, rd.file, rd.size)
		}
		rd.got += int64(len(m.Data))
		// The last byte: what else is in flight is not needed.
		rd.done = rd.got == rd.size
		if len(m.Data) > 0 {
			return m.Data, nil
		}
	}
	return nil, io.EOF
}

// layout reads the file's layout from the first window's first message
// and asks for the windows after it.
func (rd *narReader) layout(m *nats.Msg) error {
	first, err1 := strconv.ParseUint(m.Header.Get(subjects.HeaderCacheFirst), 10, 64)
	chunks, err2 := strconv.Atoi(m.Header.Get(subjects.HeaderCacheChunks))
	per, err3 := strconv.Atoi(m.Header.Get(subjects.HeaderCacheWindow))
	if err1 != nil || err2 != nil || err3 != nil || first == 0 || chunks <= 0 || per <= 0 || int64(chunks) > rd.size {
		return nil // sequential reads
	}
	rd.pipelined, rd.first, rd.chunks, rd.per = true, first, chunks, per
	for k := 1; k < cacheDepth && k*per < chunks; k++ {
		if err := rd.ask(k, first+uint64(k*per)-1); err != nil {
			return err
		}
	}
	return nil
}

// endWindow moves on after a window's direct get ended (status st): the
// file ended, or the next window is read (pipelined: one more is asked
// for to keep the depth).
func (rd *narReader) endWindow(st string) error {
	if rd.got == rd.size {
		rd.done = true
		return nil
	}
	if st == "404" && (!rd.pipelined || rd.idx == 0) {
		return fmt.Errorf("fleet cache: %s ended after %d of its %d bytes", rd.file, rd.got, rd.size)
	}
	if !rd.pipelined {
		rd.cur, rd.idx = rd.cur+1, 0
		return rd.ask(rd.cur, rd.after)
	}
	if want := min(rd.per, rd.chunks-rd.cur*rd.per); rd.idx != want {
		return fmt.Errorf("fleet cache: %s: window %d ended after %d of %d chunks", rd.file, rd.cur, rd.idx, want)
	}
	delete(rd.pending, rd.cur)
	rd.cur, rd.idx = rd.cur+1, 0
	if k := rd.asked; k*rd.per < rd.chunks {
		return rd.ask(k, rd.first+uint64(k*rd.per)-1)
	}
	return nil
}

// fetchOnce fetches path once: from the fleet cache when the release
// names it (through a loopback substituter for this fetch alone), then
// from the release's substituter, else from the host's. What came from
// the fleet cache is added to got.
func (a *Agent) fetchOnce(ctx context.Context, path string, rel *model.Release, got *model.CacheFetch) error {
	if !rel.FleetCache {
		return a.o.Activator.Fetch(ctx, path, rel.Substituter)
	}
	cs, err := ServeFleetCache(a.nc, a.o.DeviceID, a.log.With().Str("component", "fleet-cache").Logger())
	if err != nil {
		return err
	}
	err = a.o.Activator.Fetch(ctx, path, cs.URL())
	_ = cs.Close()
	got.Add(cs.Fetched())
	if err != nil && cs.SiteFailed() && ctx.Err() == nil {
		// The site's copy served a file that was cut off: the hub's
		// cache may have it right.
		a.log.Warn().Err(err).Msg("a file from the site's copy of the fleet cache was cut off; fetching from the hub's")
		if cs, err = ServeFleetCache(a.nc, a.o.DeviceID, a.log.With().Str("component", "fleet-cache").Logger()); err != nil {
			return err
		}
		cs.SkipSite()
		err = a.o.Activator.Fetch(ctx, path, cs.URL())
		_ = cs.Close()
		got.Add(cs.Fetched())
	}
	if refused := cs.Refused(); refused != nil && err != nil {
		// The fetch failed on the file the agent cut off.
		return fmt.Errorf("%w (%v)", refused, err)
	}
	if err == nil {
		a.log.Info().Str("path", path).Int64("nar_bytes", cs.NarBytes()).Msg("fetched from the fleet cache")
		return nil
	}
	if rel.Substituter == "" || ctx.Err() != nil {
		return err
	}
	a.log.Warn().Err(err).Str("substituter", RedactURL(rel.Substituter)).Msg("fleet cache fetch failed; trying the release's substituter")
	return a.o.Activator.Fetch(ctx, path, rel.Substituter)
}
