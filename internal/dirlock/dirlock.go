// Package dirlock holds a directory for one process: an exclusive advisory
// lock (flock) on the directory itself, taken before anything in it is
// opened and held for the process's life. Nothing is written into the
// directory, and the kernel drops the lock when the process ends, however
// it ends, so a crash never leaves a stale lock behind.
package dirlock

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// Lock is a held directory lock.
type Lock struct {
	f *os.File
}

// ErrBusy is wrapped by Acquire's error when another process holds dir.
var ErrBusy = errors.New("in use")

// Acquire locks dir (creating it, 0700, when missing) or fails at once when
// another process holds it, naming that process where the system tells.
func Acquire(dir string) (*Lock, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s is %w by %s", dir, ErrBusy, holder(f))
		}
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return &Lock{f: f}, nil
}

// holder names the process holding a flock on f, from /proc/locks (Linux);
// elsewhere "another process".
func holder(f *os.File) string {
	const unknown = "another process"
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return unknown
	}
	locks, err := os.Open("/proc/locks")
	if err != nil {
		return unknown
	}
	defer locks.Close()
	// "1: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF": pid, then
	// major:minor:inode of the locked file.
	ino := ":" + strconv.FormatUint(st.Ino, 10)
	sc := bufio.NewScanner(locks)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || fields[1] != "FLOCK" || !strings.HasSuffix(fields[5], ino) {
			continue
		}
		if pid, err := strconv.Atoi(fields[4]); err == nil && pid > 0 {
			return "pid " + strconv.Itoa(pid)
		}
	}
	return unknown
}

// Release drops the lock. It is safe to call on nil and more than once.
func (l *Lock) Release() {
	if l == nil || l.f == nil {
		return
	}
	_ = syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
	_ = l.f.Close()
	l.f = nil
}
