package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"fleet/model"
	"fleet/subjects"
)

// Retention of the binary cache. A store path is kept while a kept
// release's closure holds it (its references, from the narinfos), or for
// cacheGrace after it was pushed; a NAR file while a kept narinfo names it
// or for cacheGrace after it was stored. The kept releases are the newest
// cacheKeepNewest, those of every rollout not finished, and each group's
// target (groupTargets).

// cacheReleases reads every release, newest first.
func (s *services) cacheReleases(ctx context.Context) ([]*model.Release, error) {
	kv := s.c.rollouts.releases
	lister, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("list releases: %w", err)
	}
	var out []*model.Release
	for k := range lister.Keys() {
		rel, _, err := s.c.rollouts.release(ctx, k)
		if err != nil {
			s.log.Warn().Err(err).Str("release", k).Msg("cache: skipping unreadable release")
			continue
		}
		out = append(out, rel)
	}
	slices.SortFunc(out, func(a, b *model.Release) int { return b.CreatedAt.Compare(a.CreatedAt) })
	return out, nil
}

// retained waits for the narinfo index, then reads every release (newest
// first) and names those retention keeps: what cache ls and a gc pass
// both start from.
func (cs *cacheStore) retained(ctx context.Context) ([]*model.Release, map[string]bool, error) {
	if err := cs.index.wait(ctx); err != nil {
		return nil, nil, err
	}
	rels, err := cs.s.cacheReleases(ctx)
	if err != nil {
		return nil, nil, err
	}
	kept, err := cs.s.keptReleases(ctx, rels)
	if err != nil {
		return nil, nil, err
	}
	return rels, kept, nil
}

// keptReleases names the releases whose closures retention keeps.
func (s *services) keptReleases(ctx context.Context, rels []*model.Release) (map[string]bool, error) {
	kept := map[string]bool{}
	for i, r := range rels {
		if i < cacheKeepNewest {
			kept[r.ID] = true
		}
	}
	ros, err := s.c.rollouts.List(ctx)
	if err != nil {
		return nil, err
	}
	for _, ro := range ros {
		if !ro.State.Finished() {
			kept[ro.ReleaseID] = true
		}
	}
	targets, err := s.groupTargets(ctx)
	if err != nil {
		return nil, err
	}
	for _, id := range targets {
		kept[id] = true
	}
	return kept, nil
}

// groupTargets lists the releases that are a group's target: a device
// that joins the group later still fetches them.
func (s *services) groupTargets(ctx context.Context) ([]string, error) {
	kv, err := s.c.js.KeyValue(ctx, subjects.BucketGroups)
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", subjects.BucketGroups, err)
	}
	lister, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("list groups: %w", err)
	}
	var out []string
	for k := range lister.Keys() {
		e, err := kv.Get(ctx, k)
		if err != nil {
			continue
		}
		var g model.GroupTarget
		if json.Unmarshal(e.Value(), &g) == nil && g.ReleaseID != "" {
			out = append(out, g.ReleaseID)
		}
	}
	return out, nil
}

// releaseRoots are the store path hashes a release names.
func releaseRoots(r *model.Release) []string {
	var out []string
	for _, p := range r.Closures {
		out = append(out, storeHash(p))
	}
	if r.Default != "" {
		out = append(out, storeHash(r.Default))
	}
	return out
}

func storeHash(p string) string {
	base := strings.TrimPrefix(p, "/nix/store/")
	if len(base) < 32 {
		return base
	}
	return base[:32]
}

// closure adds to set every store path the cache holds that roots
// reference, directly or not; it returns the roots the cache lacks.
func closure(idx map[string]*narEntry, roots []string, set map[string]bool) (missing int) {
	stack := append([]string(nil), roots...)
	for _, r := range roots {
		if idx[r] == nil {
			missing++
		}
	}
	for len(stack) > 0 {
		h := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		e := idx[h]
		if e == nil || set[h] {
			continue
		}
		set[h] = true
		stack = append(stack, e.refs...)
	}
	return missing
}

// usage sums the NAR files of a set of store paths (each file once).
func usage(idx map[string]*narEntry, set map[string]bool) model.CacheUsage {
	u := model.CacheUsage{Paths: len(set)}
	files := map[string]bool{}
	for h := range set {
		if e := idx[h]; e != nil && !files[e.url] {
			files[e.url] = true
			u.Bytes += e.size
		}
	}
	return u
}

func (s *services) cacheList(ctx context.Context, _ *model.Admin, _ json.RawMessage) (any, error) {
	cs := s.cache
	rels, kept, err := cs.retained(ctx)
	if err != nil {
		return nil, err
	}
	idx := cs.index.snapshot()
	rep := model.CacheReport{NarInfos: len(idx), Releases: []model.CacheReleaseUsage{}}
	objs, err := cs.objects(ctx)
	if err != nil {
		return nil, err
	}
	for _, o := range objs {
		rep.Objects++
		rep.Bytes += int64(o.Size)
	}
	inAny := map[string]bool{}
	for _, r := range rels {
		set := map[string]bool{}
		missing := closure(idx, releaseRoots(r), set)
		if len(set) == 0 && missing > 0 && !r.FleetCache && r.Substituter != "" {
			continue // a release served by another cache
		}
		for h := range set {
			inAny[h] = true
		}
		rep.Releases = append(rep.Releases, model.CacheReleaseUsage{Release: r.ID, CacheUsage: usage(idx, set), Missing: missing, Kept: kept[r.ID]})
	}
	other := map[string]bool{}
	for h := range idx {
		if !inAny[h] {
			other[h] = true
		}
	}
	rep.Other = usage(idx, other)
	cs.gcMu.Lock()
	rep.GC = cs.lastGC
	cs.gcMu.Unlock()
	return rep, nil
}

// objects lists the NAR files stored.
func (cs *cacheStore) objects(ctx context.Context) ([]*jetstream.ObjectInfo, error) {
	objs, err := cs.obs.List(ctx)
	if errors.Is(err, jetstream.ErrNoObjectsFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list NAR files: %w", err)
	}
	return objs, nil
}

func (s *services) cacheGC(ctx context.Context, _ *model.Admin, raw json.RawMessage) (any, error) {
	var a model.CacheGC
	if len(raw) > 0 {
		if err := decodeArgs(raw, &a); err != nil {
			return nil, err
		}
	}
	return s.cache.gc(ctx, a.DryRun)
}

// gc runs one retention pass.
func (cs *cacheStore) gc(ctx context.Context, dryRun bool) (*model.CacheGCResult, error) {
	cs.gcMu.Lock()
	defer cs.gcMu.Unlock()
	s := cs.s
	rels, kept, err := cs.retained(ctx)
	if err != nil {
		return nil, err
	}
	now := s.now()
	cs.mu.Lock()
	grace := cs.grace
	cs.mu.Unlock()
	res := &model.CacheGCResult{At: now.UTC(), DryRun: dryRun, Releases: []string{}}
	idx := cs.index.snapshot()
	keep := map[string]bool{}
	for _, r := range rels {
		if kept[r.ID] {
			res.Releases = append(res.Releases, r.ID)
			closure(idx, releaseRoots(r), keep)
		}
	}
	slices.Sort(res.Releases)
	remove := map[string]bool{}
	for h, e := range idx {
		if !keep[h] && now.Sub(e.created) < grace {
			keep[h] = true
		}
		if !keep[h] {
			remove[h] = true
		}
	}
	res.Kept, res.Removed = usage(idx, keep), usage(idx, remove)
	files := map[string]bool{}
	for h := range keep {
		files[idx[h].url] = true
	}
	if !dryRun {
		for h := range remove {
			// Purge: no revision of a removed narinfo stays to be served.
			if err := cs.narinfo.Purge(ctx, h); err != nil {
				return nil, fmt.Errorf("remove narinfo %s: %w", h, err)
			}
			cs.index.remove(h)
		}
	}
	objs, err := cs.objects(ctx)
	if err != nil {
		return nil, err
	}
	cs.mu.Lock()
	busy := maps.Clone(cs.busy)
	cs.mu.Unlock()
	for _, o := range objs {
		if files[o.Name] || busy[o.Name] || now.Sub(o.ModTime) < grace {
			continue
		}
		res.Objects++
		if !dryRun {
			if err := cs.obs.Delete(ctx, o.Name); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
				return nil, fmt.Errorf("remove NAR file %s: %w", o.Name, err)
			}
		}
	}
	if !dryRun {
		cs.lastGC = res
		cs.log.Info().Int("removed_paths", res.Removed.Paths).Int64("removed_bytes", res.Removed.Bytes).Int("removed_files", res.Objects).
			Strs("kept_releases", res.Releases).Msg("cache: retention pass")
	}
	return res, nil
}

// gcLoop runs the retention pass every cacheGCEvery on the coordinator
// that leads the rollout engine (one per cluster).
func (cs *cacheStore) gcLoop(ctx context.Context) {
	defer close(cs.done)
	every(ctx, cacheGCEvery, func() {
		if cs.s.c.rollouts == nil || !cs.s.c.rollouts.leading.Load() {
			return
		}
		gctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		if _, err := cs.gc(gctx, false); err != nil {
			cs.log.Warn().Err(err).Msg("cache: retention pass failed")
		}
		cancel()
	})
}

var (
	descCacheNarInfos = prometheus.NewDesc("fleet_cache_narinfos", "Store paths (narinfos) in the binary cache.", nil, nil)
	descCacheObjects  = prometheus.NewDesc("fleet_cache_objects", "NAR files the binary cache's narinfos name.", nil, nil)
	descCacheBytes    = prometheus.NewDesc("fleet_cache_bytes", "Bytes of the NAR files the binary cache's narinfos name.", nil, nil)
)

// cacheCollector exports the cache's size (from the index: no bucket
// read per scrape) and its reads by site.
type cacheCollector struct{ cs *cacheStore }

// collector is the cache's metrics, for the coordinator's registry.
func (cs *cacheStore) collector() prometheus.Collector { return cacheCollector{cs} }

func (c cacheCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descCacheNarInfos
	ch <- descCacheObjects
	ch <- descCacheBytes
	c.cs.requests.Describe(ch)
	c.cs.sent.Describe(ch)
	c.cs.fetchedBytes.Describe(ch)
	c.cs.fetchedPaths.Describe(ch)
}

func (c cacheCollector) Collect(ch chan<- prometheus.Metric) {
	idx := c.cs.index.snapshot()
	all := make(map[string]bool, len(idx))
	files := map[string]bool{}
	for h, e := range idx {
		all[h] = true
		files[e.url] = true
	}
	u := usage(idx, all)
	ch <- prometheus.MustNewConstMetric(descCacheNarInfos, prometheus.GaugeValue, float64(len(idx)))
	ch <- prometheus.MustNewConstMetric(descCacheObjects, prometheus.GaugeValue, float64(len(files)))
	ch <- prometheus.MustNewConstMetric(descCacheBytes, prometheus.GaugeValue, float64(u.Bytes))
	c.cs.requests.Collect(ch)
	c.cs.sent.Collect(ch)
	c.cs.fetchedBytes.Collect(ch)
	c.cs.fetchedPaths.Collect(ch)
}
