package broker

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/internal/lockedbuf"
	"fleet/model"
	"fleet/subjects"
)

// testLogger logs into a buffer that is printed only when the test fails.
// The server may still log while it shuts down, after the test is over, so
// it cannot log through t directly.
func testLogger(t testing.TB) zerolog.Logger {
	t.Helper()
	buf := &lockedbuf.Buffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("coordinator log:\n%s", buf.String())
		}
	})
	return zerolog.New(buf).Level(zerolog.InfoLevel).With().Timestamp().Logger()
}

// testConfig is a coordinator on a free local port, without HTTP.
func testConfig(dir string) Config {
	cfg := DefaultConfig()
	cfg.DataDir = dir
	cfg.Listen = "127.0.0.1:0"
	cfg.HTTP = ""
	cfg.ServerName = "test"
	return cfg
}

// startCoordinator starts a coordinator and stops it when the test ends.
func startCoordinator(t testing.TB, cfg Config) *Coordinator {
	t.Helper()
	c, err := Start(context.Background(), cfg, testLogger(t))
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(c.Close)
	return c
}

// stop closes c and waits until it is down.
func stop(t *testing.T, c *Coordinator) {
	t.Helper()
	c.Close()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("coordinator did not stop within 10s")
	}
}

// asyncErrs records the asynchronous errors of a connection: permission
// violations arrive this way, after the operation that caused them.
type asyncErrs struct {
	mu   sync.Mutex
	errs []error
	kick chan struct{}
}

func newAsyncErrs() *asyncErrs { return &asyncErrs{kick: make(chan struct{}, 1)} }

func (a *asyncErrs) handler(_ *nats.Conn, _ *nats.Subscription, err error) {
	a.mu.Lock()
	a.errs = append(a.errs, err)
	a.mu.Unlock()
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// violation returns the first recorded permission violation of op
// ("Publish" or "Subscription") on any of subjs, if any.
func (a *asyncErrs) violation(op string, subjs ...string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, err := range a.errs {
		if !errors.Is(err, nats.ErrPermissionViolation) {
			continue
		}
		for _, s := range subjs {
			if strings.Contains(err.Error(), op+` to "`+s+`"`) {
				return err
			}
		}
	}
	return nil
}

// waitViolation waits until the server has refused op on one of subjs.
func (a *asyncErrs) waitViolation(t *testing.T, d time.Duration, op string, subjs ...string) {
	t.Helper()
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	for {
		if a.violation(op, subjs...) != nil {
			return
		}
		select {
		case <-a.kick:
		case <-deadline.C:
			a.mu.Lock()
			defer a.mu.Unlock()
			t.Fatalf("no permissions violation for %s to %q within %v (errors seen: %v)", op, subjs, d, a.errs)
		}
	}
}

// client is a TCP connection of a fleet user, as an agent or admin makes it.
type client struct {
	*nats.Conn
	pub  string
	errs *asyncErrs
	// closed is closed when the connection is closed for good.
	closed chan struct{}
}

// dial connects to url as cr, with the user's own inbox prefix, and no
// reconnects: a dropped connection stays dropped.
func dial(url string, cr *accounts.Creds, opts ...nats.Option) (*client, error) {
	seed, err := cr.Key.Seed()
	if err != nil {
		return nil, err
	}
	return dialWith(url, cr.PublicKey(), cr.InboxPrefix(), append([]nats.Option{nats.UserJWTAndSeed(cr.JWT, string(seed))}, opts...)...)
}

// dialBearer connects with a bearer JWT: no key proves it.
func dialBearer(url string, cr *accounts.Creds) (*client, error) {
	return dialWith(url, cr.PublicKey(), cr.InboxPrefix(), nats.UserJWT(
		func() (string, error) { return cr.JWT, nil },
		func([]byte) ([]byte, error) { return nil, nil },
	))
}

func dialWith(url, pub, inbox string, opts ...nats.Option) (*client, error) {
	c := &client{pub: pub, errs: newAsyncErrs(), closed: make(chan struct{})}
	base := []nats.Option{
		nats.CustomInboxPrefix(inbox),
		nats.ErrorHandler(c.errs.handler),
		nats.NoReconnect(),
		nats.Timeout(5 * time.Second),
		nats.ClosedHandler(func(*nats.Conn) { close(c.closed) }),
	}
	nc, err := nats.Connect(url, append(base, opts...)...)
	if err != nil {
		return nil, err
	}
	c.Conn = nc
	return c, nil
}

func mustDial(t testing.TB, url string, cr *accounts.Creds) *client {
	t.Helper()
	c, err := dial(url, cr)
	if err != nil {
		t.Fatalf("connect as %s: %v", cr.PublicKey(), err)
	}
	t.Cleanup(c.Close)
	return c
}

// isAuthError reports whether err is the server refusing the credentials.
func isAuthError(err error) bool {
	return errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthRevoked) ||
		errors.Is(err, nats.ErrAuthExpired) || (err != nil && strings.Contains(strings.ToLower(err.Error()), "authorization violation"))
}

func wantErr(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want one mentioning %q", parts)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not mention %q", err, p)
		}
	}
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func newKey(t testing.TB) nkeys.KeyPair {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

func pubOf(kp nkeys.KeyPair) string {
	pub, _ := kp.PublicKey()
	return pub
}

// recordDevice writes an active device record for id at site straight into
// fleet_devices, as enrollment would.
func recordDevice(t testing.TB, c *Coordinator, id, site string) {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	kv, err := c.JetStream().KeyValue(ctx, subjects.BucketDevices)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(model.Device{ID: id, Name: "dev-" + id[:6], Site: site, Status: model.DeviceActive, EnrolledAt: time.Now().UTC()})
	if _, err := kv.Put(ctx, id, b); err != nil {
		t.Fatal(err)
	}
}
