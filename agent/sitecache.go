package agent

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"

	"fleet/model"
	"fleet/subjects"
)

// A site's copy of the fleet cache: behind a leaf node set up with
// fleet-admin leaf config --cache, the leaf holds mirrors of the hub's
// cache streams in its own JetStream domain, and a device reads them with
// direct gets through FLEET's imports (subjects.SiteNar, SiteNarInfo).
// The agent asks there first; what the site does not have (a cold copy,
// no copy at all, a hub without sites) it reads from the hub through the
// coordinator. Whatever the source, the file is checked against its
// narinfo before Nix gets its last bytes, and Nix checks the narinfo's
// signatures.

// errNoSite is a read the site's copy cannot answer: there is none, or
// it lacks the object.
var errNoSite = errors.New("not in the site's cache")

const (
	// siteWait bounds one answer of the site's leaf: it is close by, and
	// where there is no copy nothing answers at once.
	siteWait = 5 * time.Second
	// siteBatch is how many chunks one direct get of the site's copy
	// asks for.
	siteBatch = 8
)

// siteAvailable reports whether the site's copy is worth asking.
func (cs *CacheServer) siteAvailable() bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return !cs.noSite
}

// siteGone records that there is no site copy to ask (no responders, or
// a leaf that does not answer): the rest of this fetch reads the hub's.
func (cs *CacheServer) siteGone(err error) {
	if errors.Is(err, nats.ErrNoResponders) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) {
		cs.mu.Lock()
		cs.noSite = true
		cs.mu.Unlock()
	}
}

// siteGet sends one direct get to the site's copy and returns its answer.
func (cs *CacheServer) siteGet(ctx context.Context, subj string, body []byte) (*nats.Msg, error) {
	if !cs.siteAvailable() {
		return nil, errNoSite
	}
	ctx, cancel := context.WithTimeout(ctx, siteWait)
	defer cancel()
	m, err := cs.nc.RequestWithContext(ctx, subj, body)
	if err != nil {
		cs.siteGone(err)
		return nil, fmt.Errorf("%w: %v", errNoSite, err)
	}
	if st := m.Header.Get("Status"); st != "" {
		return nil, fmt.Errorf("%w: status %s", errNoSite, st)
	}
	return m, nil
}

// siteNarInfo reads the narinfo of key from the site's copy.
func (cs *CacheServer) siteNarInfo(ctx context.Context, key string) (*model.NarInfo, error) {
	m, err := cs.siteGet(ctx, subjects.SiteNarInfoFor(key), nil)
	if err != nil {
		return nil, err
	}
	if op := m.Header.Get("KV-Operation"); op != "" || m.Header.Get("Nats-Stream") != subjects.StreamSiteNarInfo {
		return nil, fmt.Errorf("%w: narinfo %s deleted (%s)", errNoSite, key, op)
	}
	ni, err := model.ParseNarInfo(m.Data)
	if err != nil || ni.HashPart() != key {
		return nil, fmt.Errorf("%w: the site's narinfo of %s does not parse or names another path", errNoSite, key)
	}
	return ni, nil
}

// siteObject is the part of an object store's meta the agent reads.
type siteObject struct {
	NUID    string `json:"nuid"`
	Size    int64  `json:"size"`
	Chunks  int    `json:"chunks"`
	Deleted bool   `json:"deleted"`
}

// siteReader reads one NAR file from the site's copy, siteBatch chunks a
// request, each chunk checked to be the file's and in order.
type siteReader struct {
	cs     *CacheServer
	file   string
	obj    siteObject
	chunks string // the subject of the file's chunks
	sub    *nats.Subscription
	after  uint64
	got    int64
	n      int // chunks read
	total  int // chunks the site holds of the file (from the first batch)
	queue  [][]byte
	done   bool
}

// openSiteNar starts reading file from the site's copy: errNoSite when it
// has no such file, or another size than the narinfo says.
func (cs *CacheServer) openSiteNar(ctx context.Context, file string, ni *model.NarInfo) (*siteReader, error) {
	q, _ := json.Marshal(map[string]string{"last_by_subj": "$O." + subjects.ObjectCache + ".M." + base64.URLEncoding.EncodeToString([]byte(file))})
	m, err := cs.siteGet(ctx, subjects.SiteNar, q)
	if err != nil {
		return nil, err
	}
	sr := &siteReader{cs: cs, file: file}
	if err := json.Unmarshal(m.Data, &sr.obj); err != nil || sr.obj.Deleted || sr.obj.NUID == "" || sr.obj.Size != ni.FileSize || sr.obj.Chunks < 0 {
		return nil, fmt.Errorf("%w: %s (deleted, or not the narinfo's size)", errNoSite, file)
	}
	sr.chunks = "$O." + subjects.ObjectCache + ".C." + sr.obj.NUID
	// Two tokens under the inbox prefix: the device inbox's own
	// subscription (one token) must not get every chunk too.
	if sr.sub, err = cs.nc.SubscribeSync(cs.nc.NewInbox() + ".chunks"); err != nil {
		return nil, fmt.Errorf("fleet cache: %w", err)
	}
	if err := sr.sub.SetPendingLimits(-1, -1); err != nil { // bounded by the batch
		sr.close()
		return nil, fmt.Errorf("fleet cache: %w", err)
	}
	// The first batch now, so that a copy that lost the file's first
	// chunks (the oldest go first when it is full) sends Nix to the hub
	// rather than a file cut short.
	if sr.obj.Chunks > 0 {
		if err := sr.batch(ctx); err != nil {
			sr.close()
			return nil, fmt.Errorf("%w: %v", errNoSite, err)
		}
		if sr.total != sr.obj.Chunks {
			sr.close()
			return nil, fmt.Errorf("%w: the site holds %d of %s's %d chunks", errNoSite, sr.total, file, sr.obj.Chunks)
		}
	}
	return sr, nil
}

func (sr *siteReader) fileSize() int64 { return sr.obj.Size }
func (sr *siteReader) close()          { _ = sr.sub.Unsubscribe() }

func (sr *siteReader) next(ctx context.Context) ([]byte, error) {
	for len(sr.queue) == 0 {
		if sr.done || sr.n == sr.obj.Chunks {
			if sr.got != sr.obj.Size {
				return nil, fmt.Errorf("fleet cache: the site's %s ended after %d of %d bytes", sr.file, sr.got, sr.obj.Size)
			}
			return nil, io.EOF
		}
		if err := sr.batch(ctx); err != nil {
			return nil, err
		}
	}
	c := sr.queue[0]
	sr.queue = sr.queue[1:]
	return c, nil
}

// batch reads the next siteBatch chunks.
func (sr *siteReader) batch(ctx context.Context) error {
	q, _ := json.Marshal(map[string]any{"seq": sr.after + 1, "next_by_subj": sr.chunks, "batch": siteBatch})
	if err := sr.cs.nc.PublishRequest(subjects.SiteNar, sr.sub.Subject, q); err != nil {
		return fmt.Errorf("fleet cache: ask the site for %s: %w", sr.file, err)
	}
	ctx, cancel := context.WithTimeout(ctx, cacheWait)
	defer cancel()
	for {
		m, err := sr.sub.NextMsgWithContext(ctx)
		if err != nil {
			return fmt.Errorf("fleet cache: read the site's %s: %w", sr.file, err)
		}
		switch m.Header.Get("Status") {
		case "":
		case "204": // the batch ended
			return nil
		case "404":
			sr.done = true
			return nil
		default:
			return fmt.Errorf("fleet cache: the site's %s: status %s %s", sr.file, m.Header.Get("Status"), m.Header.Get("Description"))
		}
		seq, err := strconv.ParseUint(m.Header.Get("Nats-Sequence"), 10, 64)
		if err != nil || seq <= sr.after || m.Header.Get("Nats-Subject") != sr.chunks || m.Header.Get("Nats-Stream") != subjects.StreamSiteCache {
			return fmt.Errorf("fleet cache: the site's %s: a chunk of another file or out of order", sr.file)
		}
		if sr.got+int64(len(m.Data)) > sr.obj.Size {
			return fmt.Errorf("%w: the site's %s is longer than the %d bytes it said", ErrCacheRefused, sr.file, sr.obj.Size)
		}
		if sr.n == 0 {
			// The server counts what is left on the subject after this one.
			left, err := strconv.Atoi(m.Header.Get("Nats-Num-Pending"))
			if err != nil {
				return fmt.Errorf("fleet cache: the site's %s: no count of its chunks", sr.file)
			}
			sr.total = left + 1
		}
		sr.after = seq
		sr.got += int64(len(m.Data))
		sr.n++
		if len(m.Data) > 0 {
			sr.queue = append(sr.queue, m.Data)
		}
	}
}
