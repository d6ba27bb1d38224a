package lockedbuf

import (
	"strings"
	"sync"
	"testing"
)

// Writers at once lose nothing; a limit keeps the end.
func TestBuffer(t *testing.T) {
	var b Buffer
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 100 {
				_, _ = b.Write([]byte("x"))
			}
		})
	}
	wg.Wait()
	if n := len(b.String()); n != 800 {
		t.Fatalf("%d bytes, want 800", n)
	}
	l := Buffer{Limit: 10}
	for _, s := range []string{"aaaaaaaaaaaa", "bb", "cc"} {
		_, _ = l.Write([]byte(s))
	}
	if got := l.String(); !strings.HasSuffix(got, "bbcc") || len(got) > 12 {
		t.Fatalf("limited buffer holds %q", got)
	}
}
