package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net"
	neturl "net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/internal/natsdial"
)

// Files in the agent's state directory.
const (
	CredsFile = "agent.creds" // user JWT + seed, after enrollment
	KeyFile   = "agent.nk"    // the device's nkey seed (its identity)
	XKeyFile  = "agent.xk"    // the device's curve seed (sealed payloads)
)

// LoadCreds reads STATE_DIR/agent.creds. It returns fs.ErrNotExist (wrapped)
// when the device has not enrolled yet.
func LoadCreds(stateDir string) (*accounts.Creds, error) {
	p := filepath.Join(stateDir, CredsFile)
	if _, err := os.Stat(p); err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	c, err := accounts.ReadCreds(p)
	if err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, fs.ErrPermission) {
		return nil, fmt.Errorf("%w; if %s is damaged, remove it and enrol again with a new token (--enroll-token or --enroll-token-file from `fleet-admin token create`)", err, p)
	}
	return c, err
}

// ConnOptions are how an agent connects.
type ConnOptions struct {
	Servers []string
	Name    string
	Log     zerolog.Logger
	// OnConnect runs after the first connect and every reconnect: the agent
	// re-reads its desired state then, whatever it missed meanwhile.
	OnConnect func(*nats.Conn)
	// OnDisconnect runs when the connection drops.
	OnDisconnect func(*nats.Conn, error)
	// OnClosed runs when nats.go gives up on the connection while ctx is
	// live (not on a Close at shutdown), with the last error.
	OnClosed func(error)
	// WrapConn, when set, wraps each TCP connection to a server (see
	// natsdial.Dialer.Wrap).
	WrapConn func(net.Conn) net.Conn
}

// Connect dials the fleet with the device's creds and keeps reconnecting
// forever, with backoff and jitter. It returns at once even when no server
// is reachable yet (the first connect is retried in the background); ctx
// bounds only the setup.
func Connect(ctx context.Context, creds *accounts.Creds, o ConnOptions) (*nats.Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	seed, err := creds.Key.Seed()
	if err != nil {
		return nil, err
	}
	log := o.Log
	dialer := &natsdial.Dialer{Wrap: o.WrapConn}
	opts := []nats.Option{
		nats.UserJWTAndSeed(creds.JWT, string(seed)),
		// Templates let a device read replies only under its own prefix.
		nats.CustomInboxPrefix(creds.InboxPrefix()),
		nats.Name(o.Name),
		nats.MaxReconnects(-1),
		nats.RetryOnFailedConnect(true),
		nats.CustomReconnectDelay(backoff),
		// A dead link (a laptop that slept, a NAT that forgot it) is
		// noticed within three minutes; each ping is a message the
		// coordinator answers (at 30s, 330 a second for 10,000 devices).
		nats.PingInterval(time.Minute),
		nats.ConnectHandler(func(nc *nats.Conn) {
			log.Info().Str("server", nc.ConnectedUrlRedacted()).Msg("connected")
			if o.OnConnect != nil {
				o.OnConnect(nc)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info().Str("server", nc.ConnectedUrlRedacted()).Msg("reconnected")
			if o.OnConnect != nil {
				o.OnConnect(nc)
			}
		}),
		// Says why the agent waits when no server answers (also for the
		// first connect, retried in the background): nothing listens, the
		// address is not a NATS port, the creds were refused, or no answer.
		dialer.Option(),
		nats.ReconnectErrHandler(func(nc *nats.Conn, err error) {
			e := dialer.Explain(err, strings.Join(redactURLs(o.Servers), ","), "check --server")
			log.Warn().Err(e).Str("reason", connReason(e.Kind)).Strs("servers", redactURLs(o.Servers)).Msg(connMessage(e.Kind))
		}),
		nats.DisconnectErrHandler(func(nc *nats.Conn, err error) {
			if err != nil {
				log.Warn().Err(err).Msg("disconnected")
			}
			if o.OnDisconnect != nil {
				o.OnDisconnect(nc, err)
			}
		}),
		nats.ClosedHandler(func(nc *nats.Conn) {
			if o.OnClosed != nil && ctx.Err() == nil && nc.LastError() != nil {
				o.OnClosed(nc.LastError())
			}
		}),
		nats.ErrorHandler(func(nc *nats.Conn, sub *nats.Subscription, err error) {
			ev := log.Warn().Err(err)
			if sub != nil {
				ev = ev.Str("subject", sub.Subject)
			}
			ev.Msg("nats error")
		}),
	}
	url := nats.DefaultURL
	if len(o.Servers) > 0 {
		url = joinURLs(o.Servers)
	}
	log.Info().Strs("servers", redactURLs(o.Servers)).Msg("connecting")
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", strings.Join(redactURLs(o.Servers), ","), err)
	}
	return nc, nil
}

// connMessage is the log message of a failed (re)connect of kind k.
func connMessage(k natsdial.Kind) string {
	switch k {
	case natsdial.Auth:
		return "the coordinator refused this device's credentials; retrying"
	case natsdial.NotNATS:
		return "the server address is not a NATS port; retrying"
	case natsdial.Refused:
		return "nothing listens at the coordinator's address; retrying"
	}
	return "cannot reach the coordinator; retrying"
}

// connReason is a failed connect's kind as a log field.
func connReason(k natsdial.Kind) string {
	return map[natsdial.Kind]string{natsdial.Other: "other", natsdial.Auth: "credentials_refused", natsdial.NotNATS: "not_nats",
		natsdial.Refused: "connection_refused", natsdial.Unreachable: "no_answer", natsdial.NoHost: "unknown_host"}[k]
}

// redactURLs hides the password of URLs with userinfo (user:xxxxx@).
func redactURLs(urls []string) []string {
	out := make([]string, len(urls))
	for i, u := range urls {
		out[i] = RedactURL(u)
	}
	return out
}

// RedactURL hides the password of a URL with userinfo; a URL that does
// not parse loses everything up to its last "@".
func RedactURL(s string) string {
	u, err := neturl.Parse(s)
	if err != nil {
		if i := strings.LastIndex(s, "@"); i >= 0 {
			return "xxxxx@" + s[i+1:]
		}
		return s
	}
	if u.User == nil {
		return s
	}
	if _, ok := u.User.Password(); !ok {
		// A lone user part is often a token.
		u.User = neturl.User("xxxxx")
		return u.String()
	}
	return u.Redacted()
}

// backoff grows the reconnect delay up to a minute, so ten thousand devices
// coming back after a coordinator restart do not arrive at once.
func backoff(attempts int) time.Duration {
	d := min(time.Second<<min(attempts, 6), time.Minute)
	return d/2 + rand.N(d/2+1)
}

func joinURLs(urls []string) string {
	s := ""
	for i, u := range urls {
		if i > 0 {
			s += ","
		}
		s += u
	}
	return s
}

// IsNotEnrolled reports whether err says the device has no creds yet.
func IsNotEnrolled(err error) bool { return errors.Is(err, fs.ErrNotExist) }
