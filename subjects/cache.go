package subjects

import "fmt"

// The fleet's binary cache (DESIGN §3): NAR files in a JetStream object
// store and narinfos in a KV bucket keyed by store path hash, both in
// CORE. Devices read them only through the coordinator (CacheGet), admins
// write them only through the admin API (VerbCachePut and its chunks).
const (
	// BucketNarInfo holds one narinfo per store path, key = its hash.
	BucketNarInfo = "fleet_narinfo"
	// ObjectCache is the object store of NAR files, named nar/<hash>.nar*.
	ObjectCache = "fleet_cache"
)

// Admin API verbs of the cache.
const (
	VerbCacheQuery = "cache-query" // read: which store paths the cache lacks
	VerbCacheList  = "cache"       // read: size by release
	VerbCachePut   = "cache-put"   // write: a narinfo, then its NAR file in chunks
	VerbCacheGC    = "cache-gc"    // write: retention pass
)

// CacheChunkPrefix prefixes the subjects NAR chunks of an upload go to:
// fleet.api.write.cache-chunk.<coordinator>.<upload>. Under the admin API's
// write prefix, so only admins may send them; the coordinator that took
// the cache-put (and only it) listens, and the upload ID it answered into
// the admin's own inbox is the capability.
const CacheChunkPrefix = APIWrite + ".cache-chunk"

// CacheChunks is what coordinator inst subscribes to for its uploads.
func CacheChunks(inst string) string { return CacheChunkPrefix + "." + inst + ".*" }

// CacheChunk is the subject of upload id's chunks at coordinator inst.
func CacheChunk(inst, id string) string { return CacheChunkPrefix + "." + inst + "." + id }

// CacheGet prefixes a device's cache reads, fleet.cache.<dev>, answered
// by the coordinator only into the device's own inbox.
const (
	CacheGet    = "fleet.cache"
	AllCacheGet = CacheGet + ".*"
)

// CacheGetFor is where device id reads the cache.
func CacheGetFor(id string) string { return deviceRequest(CacheGet, id) }

// CacheDirect is FLEET's import of direct gets on the hub's object store
// stream: the coordinator, having checked a device's read, sends one
// batched direct get here with the device's inbox as the reply, and the
// server answers the chunks straight into it. No role may send it (only
// the coordinator's own users, which have every permission); at a site
// nothing answers it (the site's copy has another name).
const CacheDirect = "fleet.svc.cache.nar"

// Headers of cache replies to devices. A NAR read is answered with a
// header message naming the object, its size and the chunks a window
// holds and, when its chunks are consecutive in the stream, its layout
// (the first chunk's sequence and the number of chunks), so the device
// can name every window's cursor at once and keep several in flight;
// then the window's chunks come as the replies of a batched direct get
// (Nats-Subject, Nats-Sequence), ended by its 204 or 404 status.
const (
	HeaderCacheObject = "Fleet-Cache-Object"
	HeaderCacheSize   = "Fleet-Cache-Size"
	HeaderCacheFirst  = "Fleet-Cache-First"
	HeaderCacheChunks = "Fleet-Cache-Chunks"
	HeaderCacheWindow = "Fleet-Cache-Window"
	HeaderCacheError  = "Fleet-Cache-Error"
	HeaderCacheStatus = "Fleet-Cache-Status" // 404 for a miss, 400, 409, 429 or 500
	// HeaderCacheOffset is the offset of an upload chunk; HeaderCacheEnd
	// marks the last.
	HeaderCacheOffset = "Fleet-Cache-Offset"
	HeaderCacheEnd    = "Fleet-Cache-End"
)

// A site's copy of the cache (fleet-admin leaf config --cache): the site's
// leaf node runs JetStream in its own domain and holds, in its CORE,
// mirrors of the hub's cache streams, each fed by a durable consumer the
// coordinator made for that site. The site's cache link binds at the hub
// to an account of that site's own (SiteLinkAccountName), never to CORE:
// it has no JetStream and nothing but what it imports from CORE
// (SiteLinkImports), so no reply subject a site picks can name CORE's
// buckets (the server answers an imported request through a reply of its
// own making), nor another site's subjects (the answer is published in
// the site's own account). Devices
// at the site read the mirrors through two service imports of FLEET:
// direct gets on the mirrors, nothing else. At the hub no stream of those
// names exists, so the imports answer nothing there.
const (
	// StreamSiteCache and StreamSiteNarInfo are the mirrors at a site of
	// the object store's stream and the narinfo bucket's.
	StreamSiteCache   = "FLEET_SITE_CACHE"
	StreamSiteNarInfo = "FLEET_SITE_NARINFO"
	// SiteNar is where a device sends a direct get (JSON body) of the
	// site's NAR mirror; SiteNarInfo.<hash> gets the narinfo of a store
	// path from the site's narinfo mirror. Both FLEET, both imported.
	SiteNar     = "fleet.site.nar"
	SiteNarInfo = "fleet.site.narinfo"
	// SiteCacheObj and SiteCacheNarInfo name a site's two consumers.
	SiteCacheObj     = "obj"
	SiteCacheNarInfo = "narinfo"
	// SiteHubAPI is the JetStream API prefix a site's mirrors name for
	// the hub (their external source): in SITELINK, the prefix of its
	// imports of the hub's consumer resets.
	SiteHubAPI = "fleet.sitelink.API"
)

// SiteNarInfoFor is where a device gets the narinfo of hash at its site.
func SiteNarInfoFor(hash string) string { return SiteNarInfo + "." + hash }

// SiteCacheConsumer is the durable consumer on the hub's cache stream of
// kind (SiteCacheObj, SiteCacheNarInfo) that feeds site's mirror.
func SiteCacheConsumer(site, kind string) string { return "site_" + site + "_" + kind }

// SiteCacheDeliver is that consumer's deliver subject (CORE, which
// exports it to SITELINK).
func SiteCacheDeliver(site, kind string) string { return "fleet.sitecache." + site + "." + kind }

// SiteCacheReplies is where site's leaf answers the coordinator's requests
// to set up its mirrors (SiteCacheReply names one), in SITELINK.
func SiteCacheReplies(site string) string { return "fleet.sitecache." + site + ".reply.*" }

// SiteCacheReply is the reply subject of one such request.
func SiteCacheReply(site, id string) string { return "fleet.sitecache." + site + ".reply." + id }

// A SiteSource is a hub stream sites mirror: the kind of its consumer
// for a site (SiteCacheObj, SiteCacheNarInfo), the stream and the name of
// the site's mirror of it.
type SiteSource struct{ Kind, Stream, Mirror string }

// SiteSources are the hub's streams a site with a copy of the cache
// mirrors.
func SiteSources() []SiteSource {
	return []SiteSource{
		{SiteCacheObj, ObjectStream(ObjectCache), StreamSiteCache},
		{SiteCacheNarInfo, KVStream(BucketNarInfo), StreamSiteNarInfo},
	}
}

// siteFlowControl are the flow-control reply subjects of consumer cons
// on stream, in the server's old and new forms ($JS.FC.<stream>.<cons>.x
// and $JS.FC.<domain>.<account>.<stream>.<cons>.x).
func siteFlowControl(stream, cons string) []string {
	return []string{"$JS.FC." + stream + "." + cons + ".*", "$JS.FC.*.*." + stream + "." + cons + ".*"}
}

// SiteLinkAccountName is the name of site's link account.
func SiteLinkAccountName(site string) string { return AccountSiteLink + "_" + site }

// A LinkImport is one subject a site's link account imports from CORE:
// Subject in CORE, Local in the link account. A Service is a request the
// server answers through a reply of its own making; otherwise a stream of
// messages CORE publishes.
type LinkImport struct {
	Name, Subject, Local string
	Service              bool
}

// SiteLinkImports are site's link account's imports from CORE: the resets
// of its two consumers on the hub's cache streams (a mirror restarting
// from where it is), their flow-control responses (which ack its
// progress), and their deliveries. Nothing else of CORE, and no JetStream
// API beyond those resets, is reachable from a site's link.
// SiteLinkImports("*") are CORE's exports of them, to every site.
func SiteLinkImports(site string) []LinkImport {
	var out []LinkImport
	for _, src := range SiteSources() {
		kind, stream := src.Kind, src.Stream
		cons := "*"
		if site != "*" {
			cons = SiteCacheConsumer(site, kind)
		}
		reset := ".CONSUMER.RESET." + stream + "." + cons
		out = append(out, LinkImport{Name: "reset-" + kind, Subject: JSAPIPrefix("") + reset, Local: SiteHubAPI + reset, Service: true})
		for i, fc := range siteFlowControl(stream, cons) {
			out = append(out, LinkImport{Name: fmt.Sprintf("fc-%s-v%d", kind, i+1), Subject: fc, Local: fc, Service: true})
		}
		out = append(out, LinkImport{Name: "deliver-" + kind, Subject: SiteCacheDeliver(site, kind), Local: SiteCacheDeliver(site, kind)})
	}
	return out
}

// SiteCacheTemplate is the permission of site's cache link, a user of
// its link account. "pub" is what the site may send to the hub: a reset of its own two
// consumers, their flow-control responses and the answers to the
// coordinator's requests; "sub" what the hub sends the site: its
// consumers' deliveries, the replies to its resets, and the coordinator's
// requests to set up its mirrors in its own domain.
func SiteCacheTemplate(site string) Template {
	var pub, sub []string
	for _, src := range SiteSources() {
		kind, stream := src.Kind, src.Stream
		cons := SiteCacheConsumer(site, kind)
		pub = append(pub, SiteHubAPI+".CONSUMER.RESET."+stream+"."+cons)
		pub = append(pub, siteFlowControl(stream, cons)...)
		sub = append(sub, SiteCacheDeliver(site, kind))
	}
	pub = append(pub, SiteCacheReplies(site))
	// The whole stream API of the site's own domain: a leaf advertises its
	// domain's API as one wildcard, and only the coordinator sends
	// requests there; the site answers them.
	sub = append(sub, JSAPIPrefix(site)+".STREAM.>")
	// The replies to its mirrors' resets (only its own are in its account).
	sub = append(sub, "$JSC.R.>")
	return Template{Pub: pub, Sub: sub, ConnTypes: []string{"LEAFNODE"}}
}

// ObjectStream is the stream behind object store b.
func ObjectStream(b string) string { return "OBJ_" + b }
