package model

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// The fleet's binary cache: Nix's own narinfo documents and NAR files, kept
// by the coordinator in JetStream and read by devices over their NATS
// connection. Nix signs what matters (store path, NAR hash and size,
// references); the device's trusted-public-keys stay the only trust. These
// types carry the documents and the admin API's cache verbs.

// MaxNarInfoBytes bounds one narinfo: a store path with thousands of
// references and a few signatures is still far below it.
const MaxNarInfoBytes = 64 << 10

// MaxNarBytes bounds one NAR file in the cache.
const MaxNarBytes = 8 << 30

// NarInfo is a parsed .narinfo. Only the fields below are kept, each
// checked: what the cache stores and serves is its String, never the text
// it was given.
type NarInfo struct {
	StorePath   string
	URL         string
	Compression string
	// FileHash and FileSize are of the file at URL (compressed); NarHash
	// and NarSize of the NAR itself, which Nix checks after unpacking.
	FileHash   string
	FileSize   int64
	NarHash    string
	NarSize    int64
	References []string
	Deriver    string
	Sigs       []string
	CA         string
}

// nix32 is Nix's base-32 alphabet (no e, o, t, u).
const nix32 = "0123456789abcdfghijklmnpqrsvwxyz"

// Nix32Encode encodes b as Nix does in store paths and hashes.
func Nix32Encode(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	n := (len(b)*8-1)/5 + 1
	out := make([]byte, 0, n)
	for i := n - 1; i >= 0; i-- {
		bit := i * 5
		j, k := bit/8, uint(bit%8)
		c := b[j] >> k
		if j+1 < len(b) {
			c |= b[j+1] << (8 - k)
		}
		out = append(out, nix32[c&0x1f])
	}
	return string(out)
}

// Nix32Decode decodes s, which must encode exactly size bytes.
func Nix32Decode(s string, size int) ([]byte, error) {
	if size <= 0 || len(s) != (size*8-1)/5+1 {
		return nil, fmt.Errorf("nix32: %d characters do not encode %d bytes", len(s), size)
	}
	out := make([]byte, size)
	for n := 0; n < len(s); n++ {
		d := strings.IndexByte(nix32, s[len(s)-n-1])
		if d < 0 {
			return nil, fmt.Errorf("nix32: %q is not a base-32 digit", s[len(s)-n-1])
		}
		bit := n * 5
		i, j := bit/8, uint(bit%8)
		out[i] |= byte(d << j)
		if carry := byte(d >> (8 - j)); i+1 < size {
			out[i+1] |= carry
		} else if carry != 0 {
			return nil, errors.New("nix32: value does not fit")
		}
	}
	return out, nil
}

// SHA256Nix is the Nix form of a SHA-256 digest: "sha256:<nix32>".
func SHA256Nix(sum []byte) string { return "sha256:" + Nix32Encode(sum) }

// ParseSHA256 returns the digest of a "sha256:<nix32>" hash.
func ParseSHA256(h string) ([]byte, error) {
	rest, ok := strings.CutPrefix(h, "sha256:")
	if !ok {
		return nil, fmt.Errorf("hash %q is not sha256:<base32>", h)
	}
	return Nix32Decode(rest, sha256.Size)
}

var (
	storeHashRE = regexp.MustCompile(`^[` + nix32 + `]{32}$`)
	baseNameRE  = regexp.MustCompile(`^[` + nix32 + `]{32}-[A-Za-z0-9+\-._?=]{1,211}$`)
	sigRE       = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}:[A-Za-z0-9+/]{86}==$`)
	caRE        = regexp.MustCompile(`^(fixed|text):[A-Za-z0-9:+/=_-]{1,200}$`)
)

// narExt is the file extension of each compression a NAR file may have.
var narExt = map[string]string{"none": "", "xz": ".xz", "zstd": ".zst", "bzip2": ".bz2"}

// CheckStoreHash reports whether h is the hash part of a store path: the
// key narinfos are stored and asked for under.
func CheckStoreHash(h string) error {
	if !storeHashRE.MatchString(h) {
		return fmt.Errorf("%q is not a store path hash (32 base-32 characters)", h)
	}
	return nil
}

// CheckNarURL reports whether u names a NAR file as the cache stores them:
// nar/<file hash>.nar plus the compression's extension.
func CheckNarURL(u string) error {
	bad := fmt.Errorf("%q is not a NAR file name (nar/<base32 file hash>.nar[.xz|.zst|.bz2])", u)
	rest, ok := strings.CutPrefix(u, "nar/")
	if !ok || len(rest) < 52+4 {
		return bad
	}
	if _, err := Nix32Decode(rest[:52], sha256.Size); err != nil {
		return bad
	}
	for _, ext := range narExt {
		if rest[52:] == ".nar"+ext {
			return nil
		}
	}
	return bad
}

// HashPart is the store path's hash, the narinfo's key.
func (n *NarInfo) HashPart() string { return n.StorePath[len("/nix/store/") : len("/nix/store/")+32] }

// SigKeys names the keys the narinfo is signed with.
func (n *NarInfo) SigKeys() []string {
	out := make([]string, 0, len(n.Sigs))
	for _, s := range n.Sigs {
		k, _, _ := strings.Cut(s, ":")
		out = append(out, k)
	}
	return out
}

// ParseNarInfo parses and checks a narinfo. It takes what `nix copy --to
// file://` writes and refuses anything it could not serve safely: unknown
// or repeated fields, a NAR file not named by its own hash, sizes out of
// range, malformed hashes, references or signatures.
func ParseNarInfo(b []byte) (*NarInfo, error) {
	if len(b) > MaxNarInfoBytes {
		return nil, fmt.Errorf("narinfo is %d bytes, more than %d", len(b), MaxNarInfoBytes)
	}
	var n NarInfo
	seen := map[string]bool{}
	for i, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		k, v, ok := strings.Cut(line, ": ")
		if !ok && strings.HasSuffix(line, ":") { // "References:" with none
			k, v, ok = line[:len(line)-1], "", true
		}
		if !ok {
			return nil, fmt.Errorf("narinfo line %d is not \"Key: value\"", i+1)
		}
		if k != "Sig" && seen[k] {
			return nil, fmt.Errorf("narinfo names %s twice", k)
		}
		seen[k] = true
		var err error
		switch k {
		case "StorePath":
			n.StorePath, err = v, CheckStorePath(v)
		case "URL":
			n.URL = v
		case "Compression":
			n.Compression = v
			if _, ok := narExt[v]; !ok {
				err = fmt.Errorf("compression %q (none, xz, zstd or bzip2)", v)
			}
		case "FileHash":
			n.FileHash = v
			_, err = ParseSHA256(v)
		case "NarHash":
			n.NarHash = v
			_, err = ParseSHA256(v)
		case "FileSize":
			n.FileSize, err = parseSize(v)
		case "NarSize":
			n.NarSize, err = parseSize(v)
		case "References":
			if v != "" {
				n.References = strings.Split(v, " ")
			}
			if len(n.References) > 10000 {
				err = fmt.Errorf("%d references", len(n.References))
			}
			for _, r := range n.References {
				if !baseNameRE.MatchString(r) {
					err = fmt.Errorf("reference %q is not a store path name", r)
					break
				}
			}
		case "Deriver":
			n.Deriver = v
			if !baseNameRE.MatchString(v) || !strings.HasSuffix(v, ".drv") {
				err = fmt.Errorf("deriver %q is not a .drv name", v)
			}
		case "Sig":
			if !sigRE.MatchString(v) {
				err = fmt.Errorf("signature %q is not <key name>:<base64 ed25519 signature>", v)
			} else if len(n.Sigs) >= 16 {
				err = errors.New("more than 16 signatures")
			}
			n.Sigs = append(n.Sigs, v)
		case "CA":
			n.CA = v
			if !caRE.MatchString(v) {
				err = fmt.Errorf("CA %q", v)
			}
		default:
			err = errors.New("unknown field")
		}
		if err != nil {
			return nil, fmt.Errorf("narinfo %q: %w", CleanText(k), err)
		}
	}
	for _, k := range []string{"StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize"} {
		if !seen[k] {
			return nil, fmt.Errorf("narinfo has no %s", k)
		}
	}
	if err := CheckNarURL(n.URL); err != nil {
		return nil, fmt.Errorf("narinfo URL: %w", err)
	}
	// The file is named by its hash: a URL is one content, so two
	// narinfos naming it share it and a push cannot swap it.
	if "nar/"+strings.TrimPrefix(n.FileHash, "sha256:")+".nar"+narExt[n.Compression] != n.URL {
		return nil, fmt.Errorf("narinfo URL %s is not nar/<FileHash>.nar%s", n.URL, narExt[n.Compression])
	}
	if n.Compression == "none" && (n.FileHash != n.NarHash || n.FileSize != n.NarSize) {
		return nil, errors.New("narinfo: an uncompressed NAR file must have the NAR's hash and size")
	}
	return &n, nil
}

func parseSize(v string) (int64, error) {
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n <= 0 || n > MaxNarBytes || strconv.FormatInt(n, 10) != v {
		return 0, fmt.Errorf("size %q (1 to %d)", v, int64(MaxNarBytes))
	}
	return n, nil
}

// String is the narinfo as Nix writes it.
func (n *NarInfo) String() string {
	var b bytes.Buffer
	fmt.Fprintf(&b, "StorePath: %s\nURL: %s\nCompression: %s\nFileHash: %s\nFileSize: %d\nNarHash: %s\nNarSize: %d\nReferences: %s\n",
		n.StorePath, n.URL, n.Compression, n.FileHash, n.FileSize, n.NarHash, n.NarSize, strings.Join(n.References, " "))
	if n.Deriver != "" {
		fmt.Fprintf(&b, "Deriver: %s\n", n.Deriver)
	}
	for _, s := range n.Sigs {
		fmt.Fprintf(&b, "Sig: %s\n", s)
	}
	if n.CA != "" {
		fmt.Fprintf(&b, "CA: %s\n", n.CA)
	}
	return b.String()
}

// CacheQuery asks which store paths (by hash) the fleet cache lacks.
type CacheQuery struct {
	Hashes []string `json:"hashes"`
}

// MaxCacheQuery bounds the hashes of one query.
const MaxCacheQuery = 5000

// CacheQueryReply answers a CacheQuery: the hashes it lacks, and for each
// it has, the keys its narinfo is signed with.
type CacheQueryReply struct {
	Missing []string            `json:"missing"`
	Signed  map[string][]string `json:"signed"`
}

// CachePut offers one narinfo to the cache; its NAR file follows in
// chunks unless the cache has it.
type CachePut struct {
	NarInfo string `json:"narinfo"`
}

// CachePutReply answers a CachePut. Present: the narinfo is stored (it
// was, or its NAR file was and the narinfo now is); nothing to send.
// Otherwise Subject is where the NAR file goes, in chunks of at most Chunk
// bytes, each a request answered with a CacheChunkReply.
type CachePutReply struct {
	StorePath string `json:"store_path"`
	Present   bool   `json:"present,omitempty"`
	Subject   string `json:"subject,omitempty"`
	Chunk     int    `json:"chunk,omitempty"`
}

// CacheChunkReply acknowledges a chunk of a NAR upload: Received bytes so
// far; Stored once the last chunk checked out and the narinfo is written.
type CacheChunkReply struct {
	Received int64  `json:"received"`
	Stored   bool   `json:"stored,omitempty"`
	Error    string `json:"error,omitempty"`
}

// CacheReport is fleet-admin cache ls: what the cache holds and what each
// release's closures take of it.
type CacheReport struct {
	NarInfos int                 `json:"narinfos"`
	Objects  int                 `json:"objects"`
	Bytes    int64               `json:"bytes"`
	Releases []CacheReleaseUsage `json:"releases"`
	Other    CacheUsage          `json:"unreferenced"`
	GC       *CacheGCResult      `json:"last_gc,omitempty"`
}

// CacheUsage is a set of store paths in the cache and their NAR bytes.
type CacheUsage struct {
	Paths int   `json:"paths"`
	Bytes int64 `json:"bytes"`
}

// CacheReleaseUsage is one release's closures in the cache. Missing counts
// the release's top-level paths the cache has no narinfo for; Kept, that
// retention keeps it.
type CacheReleaseUsage struct {
	Release string `json:"release"`
	CacheUsage
	Missing int  `json:"missing"`
	Kept    bool `json:"kept"`
}

// CacheGC asks for a retention pass; DryRun reports without removing.
type CacheGC struct {
	DryRun bool `json:"dry_run,omitempty"`
}

// CacheGCResult is what a retention pass kept and removed.
type CacheGCResult struct {
	At       time.Time  `json:"at"`
	DryRun   bool       `json:"dry_run,omitempty"`
	Releases []string   `json:"kept_releases"`
	Kept     CacheUsage `json:"kept"`
	Removed  CacheUsage `json:"removed"`
	// Objects counts NAR files removed (no narinfo names them).
	Objects int `json:"removed_objects"`
}

// CacheRead is a device's read of the fleet cache (fleet.cache.<dev>):
// one narinfo by store path hash, or one window of a NAR file. Object and
// After continue a NAR read: the file's object ID and the stream sequence
// of the last chunk received.
type CacheRead struct {
	NarInfo string `json:"narinfo,omitempty"`
	Nar     string `json:"nar,omitempty"`
	Object  string `json:"object,omitempty"`
	After   uint64 `json:"after,omitempty"`
}
