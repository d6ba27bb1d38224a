package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/nats-io/nats.go"

	"fleet/model"
	"fleet/subjects"
)

// CacheCmd is `fleet-admin cache`: the fleet's binary cache, which devices
// read over their NATS connection.
type CacheCmd struct {
	Push CachePushCmd `cmd:"" help:"Copy the closures of store paths into the fleet's binary cache (only what it lacks)."`
	Ls   CacheLsCmd   `cmd:"" help:"What the cache holds, by release."`
	Gc   CacheGcCmd   `cmd:"" help:"Remove what no kept release needs (kept: group targets, unfinished rollouts, the newest releases)."`
}

// PushOpts are how closures are copied into the fleet cache.
type PushOpts struct {
	// Compression of the NAR files: zstd (default), xz or none.
	Compression string `help:"Compression of the NAR files: zstd, xz or none." default:"zstd" enum:"zstd,xz,none"`
	// SignKey signs the paths as they are copied (Nix's secret-key
	// store option); without it, the local store's signatures go along.
	SignKey string `help:"Nix signing key (nix-store --generate-binary-cache-key) to sign the paths with as they are copied; default: the signatures the local store has." type:"existingfile" placeholder:"FILE"`
	// StageDir keeps the file:// cache nix copy writes, so the next push
	// compresses only new paths (default: a temporary dir).
	StageDir string `help:"Keep the local file:// staging cache here between pushes (default: a temporary dir)." placeholder:"DIR"`
}

// CachePushCmd is `fleet-admin cache push`.
type CachePushCmd struct {
	Paths []string `arg:"" help:"Store paths; their whole closures are pushed." placeholder:"PATH"`
	PushOpts
}

// PushResult is what a push did.
type PushResult struct {
	Paths   int   `json:"paths"`   // store paths in the closures
	Present int   `json:"present"` // already in the cache
	Pushed  int   `json:"pushed"`  // added now
	Bytes   int64 `json:"bytes"`   // NAR file bytes sent
}

// Run pushes the closures.
func (cmd *CachePushCmd) Run(g *Globals) error {
	return g.withClient(func(c *Client) error {
		res, err := PushToFleetCache(g.ctx, c, cmd.Paths, cmd.PushOpts, g.progress())
		if err != nil {
			return err
		}
		if g.JSON {
			return g.printJSON(res)
		}
		_, err = fmt.Fprintf(g.stdout, "%s in the closures: %d pushed (%s), %d already in the cache\n",
			plural(res.Paths, "store path", "store paths"), res.Pushed, byteText(res.Bytes), res.Present)
		return err
	})
}

// progress is where a push reports: a line redrawn in place on a
// terminal, a line a path otherwise.
func (g *Globals) progress() *pushProgress {
	tty := false
	if f, ok := g.stderr.(*os.File); ok {
		tty = isatty.IsTerminal(f.Fd())
	}
	return &pushProgress{w: g.stderr, tty: tty}
}

type pushProgress struct {
	w           io.Writer
	tty         bool
	paths, done int
	total, sent int64
	last        time.Time
}

func (p *pushProgress) update(path string, force bool) {
	if p == nil || p.w == nil {
		return
	}
	if p.tty {
		if !force && time.Since(p.last) < 100*time.Millisecond {
			return
		}
		p.last = time.Now()
		fmt.Fprintf(p.w, "\rpushing: %d/%d paths, %s/%s   ", p.done, p.paths, byteText(p.sent), byteText(p.total))
		return
	}
	if force && path != "" {
		fmt.Fprintf(p.w, "pushed %s (%d/%d paths, %s/%s)\n", path, p.done, p.paths, byteText(p.sent), byteText(p.total))
	}
}

func (p *pushProgress) add(n int64) {
	if p != nil {
		p.sent += n
	}
}

func (p *pushProgress) end() {
	if p != nil && p.tty && p.paths > 0 {
		p.update("", true)
		fmt.Fprintln(p.w)
	}
}

// byteText is n in B, KiB, MiB or GiB.
func byteText(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// PushToFleetCache copies the closures of paths into the fleet cache: it
// asks which store paths the cache lacks, lets Nix write those (with the
// closure, as a file:// cache needs) into a staging dir, signed as Nix
// signs them, and sends each missing narinfo and its NAR file. Nothing is
// sent twice: a path the cache has is skipped, and a NAR file it has is
// not sent again.
func PushToFleetCache(ctx context.Context, c *Client, paths []string, o PushOpts, prog *pushProgress) (PushResult, error) {
	var res PushResult
	if prog == nil {
		prog = &pushProgress{}
	}
	if len(paths) == 0 {
		return res, errors.New("no store paths to push")
	}
	for _, p := range paths {
		if err := model.CheckStorePath(p); err != nil {
			return res, err
		}
	}
	all, err := closurePaths(ctx, paths)
	if err != nil {
		return res, err
	}
	res.Paths = len(all)
	missing, err := cacheMissing(ctx, c, all)
	if err != nil {
		return res, err
	}
	res.Present = len(all) - len(missing)
	if len(missing) == 0 {
		return res, nil
	}
	dir := o.StageDir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "fleet-cache-push"); err != nil {
			return res, fmt.Errorf("staging dir: %w", err)
		}
		defer os.RemoveAll(dir)
	} else if dir, err = filepath.Abs(dir); err != nil {
		return res, fmt.Errorf("--stage-dir: %w", err)
	}
	if err := stageClosures(ctx, dir, missing, o, prog); err != nil {
		return res, err
	}
	// The narinfos first, to know the bytes to send.
	type item struct {
		path string
		ni   *model.NarInfo
		raw  []byte
	}
	var items []item
	for _, p := range missing {
		h := strings.TrimPrefix(p, "/nix/store/")[:32]
		raw, err := os.ReadFile(filepath.Join(dir, h+".narinfo"))
		if err != nil {
			return res, fmt.Errorf("staged narinfo of %s: %w", p, err)
		}
		ni, err := model.ParseNarInfo(raw)
		if err != nil {
			return res, fmt.Errorf("staged narinfo of %s: %w", p, err)
		}
		if len(ni.Sigs) == 0 {
			return res, fmt.Errorf("%s is not signed: devices would refuse it; pass --sign-key, or sign it first (nix store sign --key-file KEY -r %s)", p, paths[0])
		}
		items = append(items, item{p, ni, raw})
		prog.total += ni.FileSize
	}
	prog.paths = len(items)
	defer prog.end()
	for _, it := range items {
		sent, err := pushOne(ctx, c, dir, it.ni, it.raw, prog)
		if err != nil {
			return res, err
		}
		res.Pushed++
		res.Bytes += sent
		prog.done++
		prog.update(it.path, true)
	}
	return res, nil
}

// closurePaths lists the closures of paths, dependencies first.
func closurePaths(ctx context.Context, paths []string) ([]string, error) {
	out, err := runTool(ctx, "nix-store", append([]string{"--query", "--requisites"}, paths...)...)
	if err != nil {
		return nil, err
	}
	var all []string
	for _, l := range strings.Fields(out) {
		if err := model.CheckStorePath(l); err != nil {
			return nil, fmt.Errorf("nix-store --query --requisites: %w", err)
		}
		all = append(all, l)
	}
	return all, nil
}

// cacheMissing asks the coordinator which of paths the cache lacks.
func cacheMissing(ctx context.Context, c *Client, paths []string) ([]string, error) {
	var missing []string
	for chunk := range slices.Chunk(paths, model.MaxCacheQuery) {
		q := model.CacheQuery{Hashes: make([]string, len(chunk))}
		byHash := map[string]string{}
		for i, p := range chunk {
			q.Hashes[i] = storeHash(p)
			byHash[q.Hashes[i]] = p
		}
		var r model.CacheQueryReply
		if err := c.Call(ctx, subjects.VerbCacheQuery, false, q, &r); err != nil {
			return nil, err
		}
		for _, h := range r.Missing {
			missing = append(missing, byHash[h])
		}
	}
	return missing, nil
}

// CacheSigners asks which of paths the fleet cache has, and the keys each
// is signed with (a path it lacks is absent from the map).
func CacheSigners(ctx context.Context, c *Client, paths []string) (map[string][]string, error) {
	out := map[string][]string{}
	for chunk := range slices.Chunk(paths, model.MaxCacheQuery) {
		q := model.CacheQuery{Hashes: make([]string, len(chunk))}
		for i, p := range chunk {
			q.Hashes[i] = storeHash(p)
		}
		var r model.CacheQueryReply
		if err := c.Call(ctx, subjects.VerbCacheQuery, false, q, &r); err != nil {
			return nil, err
		}
		for _, p := range chunk {
			if keys, ok := r.Signed[storeHash(p)]; ok {
				out[p] = keys
			}
		}
	}
	return out, nil
}

func storeHash(p string) string { return strings.TrimPrefix(p, "/nix/store/")[:32] }

// stageClosures has Nix copy the closures of paths into the file:// cache
// at dir: compressed and signed as Nix does it.
func stageClosures(ctx context.Context, dir string, paths []string, o PushOpts, prog *pushProgress) error {
	comp := o.Compression
	if comp == "" {
		comp = "zstd"
	}
	q := url.Values{"compression": {comp}}
	if o.SignKey != "" {
		k, err := filepath.Abs(o.SignKey)
		if err != nil {
			return fmt.Errorf("--sign-key: %w", err)
		}
		q.Set("secret-key", k)
	}
	to := "file://" + dir + "?" + q.Encode()
	var log io.Writer = io.Discard
	if prog != nil && prog.w != nil && !prog.tty {
		log = prog.w
	}
	args := append(append([]string{}, nixFeatures...), "copy", "--to", to)
	if _, err := runNix(ctx, log, append(args, paths...)...); err != nil {
		return fmt.Errorf("stage the closures: %w", err)
	}
	return nil
}

// PushNarInfo pushes one staged narinfo (raw, as Nix wrote it into the
// file:// cache at dir) and its NAR file; it returns the bytes sent.
func PushNarInfo(ctx context.Context, c *Client, dir string, raw []byte) (int64, error) {
	ni, err := model.ParseNarInfo(raw)
	if err != nil {
		return 0, err
	}
	return pushOne(ctx, c, dir, ni, raw, nil)
}

// pushOne offers a narinfo and, when asked, sends its NAR file in chunks,
// each answered before the next; it returns the bytes sent.
func pushOne(ctx context.Context, c *Client, dir string, ni *model.NarInfo, raw []byte, prog *pushProgress) (int64, error) {
	var r model.CachePutReply
	if err := c.Call(ctx, subjects.VerbCachePut, true, model.CachePut{NarInfo: string(raw)}, &r); err != nil {
		return 0, fmt.Errorf("push %s: %w", ni.StorePath, err)
	}
	if r.Present {
		prog.add(ni.FileSize)
		return 0, nil
	}
	if r.Chunk <= 0 || !strings.HasPrefix(r.Subject, subjects.CacheChunkPrefix+".") {
		return 0, fmt.Errorf("push %s: the coordinator named no upload", ni.StorePath)
	}
	f, err := os.Open(filepath.Join(dir, filepath.FromSlash(ni.URL)))
	if err != nil {
		return 0, fmt.Errorf("push %s: %w", ni.StorePath, err)
	}
	defer f.Close()
	buf := make([]byte, r.Chunk)
	var off int64
	for {
		n, rerr := io.ReadFull(f, buf)
		if rerr != nil && !errors.Is(rerr, io.ErrUnexpectedEOF) && !errors.Is(rerr, io.EOF) {
			return off, fmt.Errorf("push %s: read %s: %w", ni.StorePath, ni.URL, rerr)
		}
		last := rerr != nil || off+int64(n) == ni.FileSize
		m := nats.NewMsg(r.Subject)
		m.Data = buf[:n]
		m.Header.Set(subjects.HeaderCacheOffset, strconv.FormatInt(off, 10))
		if last {
			m.Header.Set(subjects.HeaderCacheEnd, "1")
		}
		var ack model.CacheChunkReply
		if err := c.chunk(ctx, m, &ack); err != nil {
			return off, fmt.Errorf("push %s: %w", ni.StorePath, err)
		}
		if ack.Error != "" {
			return off, fmt.Errorf("push %s: the coordinator refused: %s", ni.StorePath, ack.Error)
		}
		off += int64(n)
		prog.add(int64(n))
		prog.update(ni.StorePath, false)
		if last {
			if !ack.Stored {
				return off, fmt.Errorf("push %s: the coordinator did not store it", ni.StorePath)
			}
			return off, nil
		}
	}
}

// chunk sends one upload chunk and decodes its answer.
func (c *Client) chunk(ctx context.Context, m *nats.Msg, out any) error {
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()
	resp, err := c.nc.RequestMsgWithContext(ctx, m)
	if err != nil {
		return fmt.Errorf("send chunk: %w", err)
	}
	if err := json.Unmarshal(resp.Data, out); err != nil {
		return fmt.Errorf("chunk answer does not decode: %w", err)
	}
	return nil
}

// runTool runs a Nix tool other than nix itself and returns its stdout.
func runTool(ctx context.Context, name string, args ...string) (string, error) {
	var stdout strings.Builder
	tail := &tailBuffer{max: 2048}
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout = &stdout
	cmd.Stderr = tail
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s: %w: %s", name, err, strings.TrimSpace(tail.String()))
	}
	return stdout.String(), nil
}

// CacheLsCmd is `fleet-admin cache ls`.
type CacheLsCmd struct{}

// Run shows the cache by release.
func (CacheLsCmd) Run(g *Globals) error {
	var rep model.CacheReport
	if err := g.call(subjects.VerbCacheList, false, struct{}{}, &rep); err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(rep)
	}
	tw := newTable(g.stdout)
	fmt.Fprintln(tw, "RELEASE\tPATHS\tSIZE\tMISSING\tKEPT")
	slices.SortFunc(rep.Releases, func(a, b model.CacheReleaseUsage) int { return strings.Compare(a.Release, b.Release) })
	for _, r := range rep.Releases {
		kept := "no"
		if r.Kept {
			kept = "yes"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\n", r.Release, r.Paths, byteText(r.Bytes), r.Missing, kept)
	}
	fmt.Fprintf(tw, "(no release)\t%d\t%s\t-\t-\n", rep.Other.Paths, byteText(rep.Other.Bytes))
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(g.stdout, "%s, %s in %s\n", plural(rep.NarInfos, "store path", "store paths"), byteText(rep.Bytes), plural(rep.Objects, "NAR file", "NAR files"))
	return err
}

// CacheGcCmd is `fleet-admin cache gc`.
type CacheGcCmd struct {
	DryRun bool `help:"Say what would be removed; remove nothing."`
}

// Run runs a retention pass.
func (cmd *CacheGcCmd) Run(g *Globals) error {
	var res model.CacheGCResult
	if err := g.call(subjects.VerbCacheGC, true, model.CacheGC{DryRun: cmd.DryRun}, &res); err != nil {
		return err
	}
	if g.JSON {
		return g.printJSON(res)
	}
	verb := "removed"
	if res.DryRun {
		verb = "would remove"
	}
	_, err := fmt.Fprintf(g.stdout, "kept %s (%s) of %s; %s %s (%s) and %s\n",
		plural(res.Kept.Paths, "store path", "store paths"), byteText(res.Kept.Bytes), plural(len(res.Releases), "release", "releases"),
		verb, plural(res.Removed.Paths, "store path", "store paths"), byteText(res.Removed.Bytes), plural(res.Objects, "unreferenced NAR file", "unreferenced NAR files"))
	return err
}

// RawConn is the client's NATS connection, for sending what fleet-admin
// would not (tests of the coordinator's refusals).
func (c *Client) RawConn() *nats.Conn { return c.nc }
