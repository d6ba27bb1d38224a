// Package natsdial dials NATS servers for fleet's clients so that a failed
// connection says what went wrong: nothing listens on the port, something
// that is not NATS answers there (an HTTP port, say), the credentials were
// refused, or the host does not answer at all. nats.go alone reports a
// closed port as "no servers available" and a silent port only after its
// whole timeout.
package natsdial

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
)

// DefaultGreeting is how long a server may take to send its INFO once the
// TCP connection is up. A NATS server sends it at once; a port that stays
// silent this long is not a NATS port.
const DefaultGreeting = 1500 * time.Millisecond

// Kind is what went wrong with a connection.
type Kind int

const (
	// Other is any failure not classified below.
	Other Kind = iota
	// Refused: nothing listens at the address (connection refused).
	Refused
	// NotNATS: something answers at the address but does not speak NATS.
	NotNATS
	// Auth: the server refused the credentials.
	Auth
	// Unreachable: the host does not answer (timeout, no route).
	Unreachable
	// NoHost: the host name does not resolve.
	NoHost
)

// Dialer is a nats.CustomDialer that remembers what happened on the last
// connection it made. Use one Dialer per nats.Conn (Option gives both).
type Dialer struct {
	// Timeout bounds the TCP dial (default 5s).
	Timeout time.Duration
	// Greeting bounds the wait for the server's first bytes (default
	// DefaultGreeting).
	Greeting time.Duration
	// Wrap, when set, wraps each TCP connection made (a bench reads the
	// kernel's receive times through it).
	Wrap func(net.Conn) net.Conn

	mu      sync.Mutex
	addr    string
	dialErr error
	silent  bool
	first   string
}

// Option returns a nats.Option that dials through d.
func (d *Dialer) Option() nats.Option { return nats.SetCustomDialer(d) }

// Dial implements nats.CustomDialer.
func (d *Dialer) Dial(network, address string) (net.Conn, error) {
	timeout := d.Timeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	d.mu.Lock()
	d.addr, d.dialErr, d.silent, d.first = address, nil, false, ""
	d.mu.Unlock()
	c, err := (&net.Dialer{Timeout: timeout}).Dial(network, address)
	if err != nil {
		d.mu.Lock()
		d.dialErr = err
		d.mu.Unlock()
		return nil, err
	}
	if d.Wrap != nil {
		c = d.Wrap(c)
	}
	greeting := d.Greeting
	if greeting <= 0 {
		greeting = DefaultGreeting
	}
	return &conn{Conn: c, d: d, greetBy: time.Now().Add(greeting)}, nil
}

// conn caps every deadline at greetBy until the server has sent a byte,
// then restores the deadline nats.go asked for.
type conn struct {
	net.Conn
	d *Dialer

	mu       sync.Mutex
	greeted  bool
	greetBy  time.Time
	asked    time.Time
	askedSet bool
}

func (c *conn) capped(t time.Time) time.Time {
	if t.IsZero() || t.After(c.greetBy) {
		return c.greetBy
	}
	return t
}

func (c *conn) SetDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.asked, c.askedSet = t, true
	if !c.greeted {
		t = c.capped(t)
	}
	return c.Conn.SetDeadline(t)
}

func (c *conn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.greeted {
		t = c.capped(t)
	}
	return c.Conn.SetReadDeadline(t)
}

func (c *conn) Read(p []byte) (int, error) {
	c.mu.Lock()
	greeted := c.greeted
	if !greeted && !c.askedSet {
		// nats.go reads the INFO with the deadline it set; without one,
		// still wait no longer than greetBy.
		_ = c.Conn.SetReadDeadline(c.greetBy)
	}
	c.mu.Unlock()
	n, err := c.Conn.Read(p)
	if greeted {
		return n, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if n > 0 && !c.greeted {
		c.greeted = true
		c.d.mu.Lock()
		c.d.first = string(p[:min(n, 16)])
		c.d.mu.Unlock()
		if c.askedSet {
			_ = c.Conn.SetDeadline(c.asked)
		} else {
			_ = c.Conn.SetReadDeadline(time.Time{})
		}
		return n, err
	}
	var ne net.Error
	if n == 0 && errors.As(err, &ne) && ne.Timeout() {
		c.d.mu.Lock()
		c.d.silent = true
		c.d.mu.Unlock()
	}
	return n, err
}

// Classify says what kind of failure err (from nats.Connect or a
// reconnect) was, from what d saw on its last connection.
func (d *Dialer) Classify(err error) Kind {
	if err == nil {
		return Other
	}
	if isAuth(err) {
		return Auth
	}
	d.mu.Lock()
	dialErr, silent, first := d.dialErr, d.silent, d.first
	d.mu.Unlock()
	if first != "" && !strings.HasPrefix(first, "INFO") {
		return NotNATS
	}
	if silent && first == "" {
		return NotNATS
	}
	if strings.Contains(err.Error(), "expected 'INFO'") {
		return NotNATS
	}
	if dialErr != nil {
		return classifyDial(dialErr)
	}
	return classifyDial(err)
}

func classifyDial(err error) Kind {
	var dns *net.DNSError
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return Refused
	case errors.As(err, &dns):
		return NoHost
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return Unreachable
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return Unreachable
	}
	return Other
}

func isAuth(err error) bool {
	if errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthExpired) || errors.Is(err, nats.ErrAuthRevoked) ||
		errors.Is(err, nats.ErrAccountAuthExpired) {
		return true
	}
	s := strings.ToLower(err.Error())
	return strings.Contains(s, "authorization violation") || strings.Contains(s, "authentication expired") ||
		strings.Contains(s, "authentication revoked")
}

// Error is a failed connection, classified.
type Error struct {
	Kind Kind
	// Addr is the host:port of the last server tried.
	Addr string
	// Hint is what to check, in the words of the program that connected.
	Hint string
	Err  error
}

func (e *Error) Error() string {
	var what string
	switch e.Kind {
	case Refused:
		what = fmt.Sprintf("nothing listens at %s (connection refused)", e.Addr)
	case NotNATS:
		what = fmt.Sprintf("%s answers but does not speak NATS (no NATS greeting): it is another service's port, e.g. an HTTP port such as the coordinator's --http, not its NATS --listen port (4222 by default)", e.Addr)
	case Auth:
		what = fmt.Sprintf("the server at %s refused the credentials (%v): they are not valid for this fleet, or were revoked", e.Addr, e.Err)
	case Unreachable:
		what = fmt.Sprintf("no answer from %s (%v): is the host up and the port open in its firewall?", e.Addr, e.Err)
	case NoHost:
		what = fmt.Sprintf("cannot resolve the host of %s (%v)", e.Addr, e.Err)
	default:
		what = fmt.Sprintf("cannot connect to %s: %v", e.Addr, e.Err)
	}
	if e.Hint != "" {
		what += "; " + e.Hint
	}
	return what
}

func (e *Error) Unwrap() error { return e.Err }

// Explain wraps err (from nats.Connect or a reconnect) as an *Error, with
// servers naming what was dialled when d saw no address.
func (d *Dialer) Explain(err error, servers string, hint string) *Error {
	d.mu.Lock()
	addr := d.addr
	d.mu.Unlock()
	if addr == "" {
		addr = servers
	}
	return &Error{Kind: d.Classify(err), Addr: addr, Hint: hint, Err: err}
}
