package bench

import (
	"bytes"
	"net"
	"strconv"
	"time"
)

// A simulator's notify latency is when a trigger reached the device: the
// kernel's receive time of the bytes that carried it, read from the
// connection's socket (SO_TIMESTAMPNS), not the moment a goroutine of the
// simulator got round to it. Thousands of simulated devices share two
// cores with the server, and a goroutine noting the arrival waits its turn
// behind every other device's apply; a real device has its own CPU. The
// user-space moments are measured as well ("began to fetch").

// stampConn passes a NATS connection's bytes through unchanged, and calls
// onMsg with the payload of each message on subject and the time its
// bytes arrived.
type stampConn struct {
	net.Conn
	recv func(p []byte) (n int, at time.Time, err error)
	p    protoScanner
}

// stampedConn wraps c (see stampConn); where the kernel gives no receive
// times, the time a read returns stands in.
func stampedConn(c net.Conn, subject string, onMsg func(at time.Time, payload []byte)) net.Conn {
	s := &stampConn{Conn: c, p: protoScanner{subject: []byte(subject), onMsg: onMsg}}
	s.recv = kernelStamps(c)
	if s.recv == nil {
		s.recv = func(p []byte) (int, time.Time, error) {
			n, err := c.Read(p)
			return n, time.Now(), err
		}
	}
	return s
}

func (c *stampConn) Read(p []byte) (int, error) {
	n, at, err := c.recv(p)
	if n > 0 {
		c.p.scan(p[:n], at)
	}
	return n, err
}

// stampDialer is a nats.CustomDialer whose connections are stampConns.
type stampDialer struct {
	subject string
	onMsg   func(at time.Time, payload []byte)
}

func (d stampDialer) Dial(network, address string) (net.Conn, error) {
	c, err := (&net.Dialer{Timeout: 5 * time.Second}).Dial(network, address)
	if err != nil {
		return nil, err
	}
	return stampedConn(c, d.subject, d.onMsg), nil
}

// protoScanner follows the server-to-client side of the NATS protocol
// (INFO, MSG, HMSG, PING, PONG, +OK, -ERR: each a line, MSG and HMSG then
// a payload of the size the line gives) and hands on the payloads of
// messages on one subject. A stream it cannot follow (a line longer than
// maxLine, a size that does not parse) stops it: it never fails the
// connection it watches.
type protoScanner struct {
	subject []byte
	onMsg   func(at time.Time, payload []byte)

	line    []byte
	skip    int    // payload bytes (and CRLF) still to pass over
	want    int    // payload bytes (and CRLF) still to collect
	hdr     int    // header bytes at the start of the collected payload
	payload []byte // the payload being collected
	lost    bool
}

// maxLine bounds a protocol line (an INFO with many cluster URLs is the
// longest).
const maxLine = 1 << 16

func (s *protoScanner) scan(b []byte, at time.Time) {
	for len(b) > 0 && !s.lost {
		switch {
		case s.skip > 0:
			n := min(s.skip, len(b))
			s.skip -= n
			b = b[n:]
		case s.want > 0:
			n := min(s.want, len(b))
			s.payload = append(s.payload, b[:n]...)
			s.want -= n
			b = b[n:]
			if s.want == 0 {
				// Stamped with the read that brought its last bytes.
				body := s.payload[:len(s.payload)-2] // less the CRLF
				s.onMsg(at, body[s.hdr:])
				s.payload = s.payload[:0]
			}
		default:
			i := bytes.IndexByte(b, '\n')
			if i < 0 {
				s.line = append(s.line, b...)
				if len(s.line) > maxLine {
					s.lost = true
				}
				return
			}
			line := b[:i]
			if len(s.line) > 0 {
				s.line = append(s.line, line...)
				line = s.line
			}
			b = b[i+1:]
			s.op(bytes.TrimSuffix(line, []byte("\r")))
			s.line = s.line[:0]
		}
	}
}

// op reads one protocol line: a MSG or HMSG sets up its payload.
func (s *protoScanner) op(line []byte) {
	f := bytes.Fields(line)
	if len(f) == 0 {
		return
	}
	var hdr, total int
	var err error
	switch string(f[0]) {
	case "MSG": // MSG subject sid [reply] size
		if len(f) != 4 && len(f) != 5 {
			s.lost = true
			return
		}
		total, err = strconv.Atoi(string(f[len(f)-1]))
	case "HMSG": // HMSG subject sid [reply] hdrsize size
		if len(f) != 5 && len(f) != 6 {
			s.lost = true
			return
		}
		hdr, err = strconv.Atoi(string(f[len(f)-2]))
		if err == nil {
			total, err = strconv.Atoi(string(f[len(f)-1]))
		}
	default:
		return
	}
	if err != nil || total < 0 || hdr < 0 || hdr > total {
		s.lost = true
		return
	}
	if !bytes.Equal(f[1], s.subject) {
		s.skip = total + 2
		return
	}
	s.want, s.hdr = total+2, hdr
}
