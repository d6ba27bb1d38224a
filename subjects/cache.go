package subjects

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

// Headers of cache replies to devices. A NAR read is answered with a
// window of chunk messages: each names its stream sequence (the cursor
// of the next read), the first the object and its size, the last says
// whether the window or the file ended. The first window's first message
// also names the file's layout when its chunks are consecutive in the
// stream (the first chunk's sequence, the number of chunks and the chunks
// a window holds), so the device can name every window's cursor at once
// and keep several in flight.
const (
	HeaderCacheSeq    = "Fleet-Cache-Seq"
	HeaderCacheObject = "Fleet-Cache-Object"
	HeaderCacheSize   = "Fleet-Cache-Size"
	HeaderCacheLast   = "Fleet-Cache-Last" // "window" or "eof"
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
