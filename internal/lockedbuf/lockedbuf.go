// Package lockedbuf holds a bytes.Buffer that goroutines may write and read
// at once: a command's stdout and stderr together, a logger under test.
package lockedbuf

import (
	"bytes"
	"sync"
)

// Buffer is a bytes.Buffer behind a mutex. The zero value is empty and
// unbounded.
type Buffer struct {
	// Limit, when positive, bounds what is kept: past it, only the last
	// half of the limit stays (a runaway log keeps its end).
	Limit int

	mu sync.Mutex
	b  bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.Limit > 0 && b.b.Len() > b.Limit {
		rest := b.b.Bytes()[b.b.Len()-b.Limit/2:]
		b.b = *bytes.NewBuffer(append([]byte(nil), rest...))
	}
	return b.b.Write(p)
}

// String is what the buffer holds.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
