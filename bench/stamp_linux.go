package bench

import (
	"io"
	"net"
	"syscall"
	"time"
	"unsafe"
)

// kernelStamps turns on SO_TIMESTAMPNS for c and returns a read that
// also gives the kernel's receive time of the bytes read (of the last
// segment, for TCP: never earlier than they came). nil when c is not a
// TCP connection or the option is refused.
func kernelStamps(c net.Conn) func(p []byte) (int, time.Time, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_TIMESTAMPNS, 1)
	}); err != nil || serr != nil {
		return nil
	}
	oob := make([]byte, syscall.CmsgSpace(int(unsafe.Sizeof(syscall.Timespec{}))))
	return func(p []byte) (int, time.Time, error) {
		var n, oobn int
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			for {
				n, oobn, _, _, rerr = syscall.Recvmsg(int(fd), p, oob, 0)
				if rerr != syscall.EINTR {
					return rerr != syscall.EAGAIN
				}
			}
		})
		if err == nil {
			err = rerr
		}
		if err != nil {
			return 0, time.Time{}, err
		}
		if n == 0 && len(p) > 0 {
			return 0, time.Time{}, io.EOF
		}
		at := time.Now()
		if msgs, perr := syscall.ParseSocketControlMessage(oob[:oobn]); perr == nil {
			for _, m := range msgs {
				if m.Header.Level == syscall.SOL_SOCKET && m.Header.Type == syscall.SCM_TIMESTAMPNS && len(m.Data) >= int(unsafe.Sizeof(syscall.Timespec{})) {
					ts := (*syscall.Timespec)(unsafe.Pointer(&m.Data[0]))
					at = time.Unix(ts.Unix())
				}
			}
		}
		return n, at, nil
	}
}
