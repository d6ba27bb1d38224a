package broker

import (
	"encoding/base64"
	"encoding/json"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"fleet/model"
)

// Paging of the admin API's listings (see model.Page). Sorted listings use
// the sort key of a page's last item as the cursor, so a page never repeats
// or skips an item that was there all along, whatever is added or removed
// meanwhile; stream listings (facts, audit) use the last stream sequence.
// Cursors are base64 so clients treat them as opaque.

// maxPageBytes bounds the encoded items of one page, well under the 1 MiB
// NATS max payload whatever the size of each item.
const maxPageBytes = 512 << 10

// Page size caps by verb: the most items one reply carries.
const (
	capDevices  = 200 // devices
	capStatus   = 1000
	capProgress = 200 // rollout progress rows
	capFacts    = 200
	capAudit    = 200
	capList     = 500 // tokens, admins, releases, rollouts
)

// pageLimit is the page size of p under the cap.
func pageLimit(p model.Page, limit int) int {
	if p.Limit <= 0 || p.Limit > limit {
		return limit
	}
	return p.Limit
}

func encodeCursor(key string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(key))
}

func decodeCursor(c string) (string, error) {
	b, err := base64.RawURLEncoding.DecodeString(c)
	if err != nil {
		return "", badRequest("page cursor %q is not one this coordinator gave (start from the first page)", c)
	}
	return string(b), nil
}

// seqCursor is the cursor after stream sequence seq.
func seqCursor(seq uint64) string { return encodeCursor(strconv.FormatUint(seq, 10)) }

// decodeSeqCursor returns the stream sequence a cursor names (0: none).
func decodeSeqCursor(c string) (uint64, error) {
	if c == "" {
		return 0, nil
	}
	k, err := decodeCursor(c)
	if err != nil {
		return 0, err
	}
	seq, err := strconv.ParseUint(k, 10, 64)
	if err != nil {
		return 0, badRequest("page cursor %q is not one this coordinator gave (start from the first page)", c)
	}
	return seq, nil
}

// pageSorted sorts items by key (unique per item) and returns the page p
// selects, at most limit items (and about maxPageBytes), with the cursor of
// the next page ("" after the last).
func pageSorted[T any](items []T, key func(*T) string, p model.Page, limit int) ([]T, string, error) {
	after := ""
	if p.After != "" {
		var err error
		if after, err = decodeCursor(p.After); err != nil {
			return nil, "", err
		}
	}
	keys := make([]string, len(items))
	idx := make([]int, len(items))
	for i := range items {
		keys[i], idx[i] = key(&items[i]), i
	}
	slices.SortFunc(idx, func(a, b int) int { return strings.Compare(keys[a], keys[b]) })
	start := 0
	if p.After != "" {
		start = sort.Search(len(idx), func(i int) bool { return keys[idx[i]] > after })
	}
	n := pageLimit(p, limit)
	out := []T{}
	size := 0
	end := start
	for ; end < len(idx) && len(out) < n; end++ {
		it := items[idx[end]]
		b, _ := json.Marshal(it)
		if len(out) > 0 && size+len(b)+1 > maxPageBytes {
			break
		}
		size += len(b) + 1
		out = append(out, it)
	}
	next := ""
	if end < len(idx) {
		next = encodeCursor(keys[idx[end-1]])
	}
	return out, next, nil
}

// pageOf builds the reply of a sorted listing.
func pageOf[T any](items []T, key func(*T) string, p model.Page, limit int) (*model.PageOf[T], error) {
	page, next, err := pageSorted(items, key, p, limit)
	if err != nil {
		return nil, err
	}
	return &model.PageOf[T]{Items: page, Next: next, Total: len(items)}, nil
}

// timeKey orders by t, then by id: a fixed-width UTC time sorts as a string.
func timeKey(t time.Time, id string) string {
	return t.UTC().Format("2006-01-02T15:04:05.000000000Z") + "\x00" + id
}
