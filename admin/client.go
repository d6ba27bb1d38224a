package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"fleet/accounts"
	"fleet/internal/natsdial"
	"fleet/model"
	"fleet/subjects"
)

// Client calls the coordinator's admin API with an admin's creds; the same
// key that authenticates the connection signs each request.
type Client struct {
	nc     *nats.Conn
	creds  *accounts.Creds
	server string
	// denied cancels requests whose publish the server refused: nats.go
	// reports that asynchronously, and the request would otherwise wait for
	// its timeout.
	mu     sync.Mutex
	denied map[string]context.CancelCauseFunc
	// lost is closed once the connection has been down for LostAfter;
	// a reconnect replaces it. lostTimer counts down while it is down.
	lost      chan struct{}
	lostErr   error
	lostTimer *time.Timer
	// Timeout bounds one request when ctx has no deadline.
	Timeout time.Duration
	// LostAfter is how long the connection may be down (reconnecting)
	// before requests and waits give up on the coordinator.
	LostAfter time.Duration
	// PageSize is the page size listings ask for (0: the coordinator's
	// cap, which also bounds larger values).
	PageSize int
}

// errLost marks errors of a connection to the coordinator that was lost.
var errLost = errors.New("lost the connection to the coordinator")

// Dial connects to server with the creds file at credsPath.
func Dial(ctx context.Context, server, credsPath string) (*Client, error) {
	if credsPath == "" {
		return nil, errors.New("no admin credentials: pass --creds, set FLEET_CREDS or use a NATS context (--context; the first owner's creds are DATA_DIR/admin.creds)")
	}
	cr, err := accounts.ReadCreds(credsPath)
	if err != nil {
		return nil, fmt.Errorf("--creds: %w (check --creds / FLEET_CREDS: an admin's creds file, e.g. DATA_DIR/admin.creds)", err)
	}
	return DialCreds(ctx, server, cr)
}

// DialCreds connects to server with cr. A failure says whether nothing
// listens there, something other than NATS does, or the creds were refused
// (a *natsdial.Error).
func DialCreds(ctx context.Context, server string, cr *accounts.Creds) (*Client, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	seed, err := cr.Key.Seed()
	if err != nil {
		return nil, err
	}
	c := &Client{creds: cr, server: server, Timeout: 30 * time.Second, LostAfter: 3 * time.Second,
		denied: map[string]context.CancelCauseFunc{}, lost: make(chan struct{})}
	d := &natsdial.Dialer{}
	nc, err := nats.Connect(server,
		nats.UserJWTAndSeed(cr.JWT, string(seed)),
		nats.ErrorHandler(c.onError),
		// Templates let an admin read replies only under its own prefix.
		nats.CustomInboxPrefix(cr.InboxPrefix()),
		nats.Name("fleet-admin"),
		d.Option(),
		nats.Timeout(10*time.Second),
		// A silent network is noticed within seconds, not minutes.
		nats.PingInterval(5*time.Second),
		nats.MaxPingsOutstanding(2),
		nats.ReconnectWait(time.Second),
		nats.DisconnectErrHandler(c.onDisconnect),
		nats.ReconnectHandler(c.onReconnect),
	)
	if err != nil {
		return nil, d.Explain(err, server, "check --server / FLEET_SERVER (the coordinator's NATS address) and --creds / FLEET_CREDS")
	}
	c.nc = nc
	return c, nil
}

func (c *Client) onError(_ *nats.Conn, _ *nats.Subscription, err error) {
	if !errors.Is(err, nats.ErrPermissionViolation) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for subj, cancel := range c.denied {
		if strings.Contains(err.Error(), `"`+subj+`"`) {
			cancel(err)
		}
	}
}

func (c *Client) onDisconnect(nc *nats.Conn, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil {
		err = errors.New("connection closed")
	}
	c.lostErr = err
	if c.lostTimer != nil || nc.IsClosed() {
		return
	}
	lost := c.lost
	c.lostTimer = time.AfterFunc(c.LostAfter, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.lost == lost && c.lostTimer != nil {
			select {
			case <-lost:
			default:
				close(lost)
			}
		}
	})
}

func (c *Client) onReconnect(*nats.Conn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.lostTimer != nil {
		c.lostTimer.Stop()
		c.lostTimer = nil
	}
	select {
	case <-c.lost:
		c.lost = make(chan struct{})
	default:
	}
}

// Lost returns a channel that is closed once the connection to the
// coordinator has been down for LostAfter.
func (c *Client) Lost() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lost
}

// LostError says that, and why, the coordinator was lost.
func (c *Client) LostError() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return fmt.Errorf("%w at %s (%v): it stopped or the network is down", errLost, c.server, c.lostErr)
}

// Close closes the connection.
func (c *Client) Close() {
	c.mu.Lock()
	if c.lostTimer != nil {
		c.lostTimer.Stop()
		c.lostTimer = nil
	}
	c.mu.Unlock()
	c.nc.Close()
}

// Key is the admin's public key.
func (c *Client) Key() string { return c.creds.PublicKey() }

// APIError is an error reply of the coordinator.
type APIError struct {
	Verb, Code, Msg string
}

func (e *APIError) Error() string { return e.Msg }

// Call signs a request for verb with args, sends it and decodes the reply's
// data into out (when not nil).
func (c *Client) Call(ctx context.Context, verb string, write bool, args, out any) error {
	env, err := c.Sign(verb, args, time.Now())
	if err != nil {
		return err
	}
	return c.Send(ctx, verb, write, env, out)
}

// Sign builds the signed envelope of a request (exported for tests that
// send stale or replayed ones).
func (c *Client) Sign(verb string, args any, at time.Time) ([]byte, error) {
	s, err := model.SignRequest(c.creds.Key, verb, args, at)
	if err != nil {
		return nil, err
	}
	return json.Marshal(s)
}

// Send sends a signed envelope to verb and decodes the reply into out.
func (c *Client) Send(ctx context.Context, verb string, write bool, env []byte, out any) error {
	subj := subjects.APIReadVerb(verb)
	if write {
		subj = subjects.APIWriteVerb(verb)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.Timeout)
		defer cancel()
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	c.mu.Lock()
	c.denied[subj] = cancel
	lost := c.lost
	c.mu.Unlock()
	// A connection down for LostAfter ends the request at once.
	go func() {
		select {
		case <-lost:
			cancel(c.LostError())
		case <-ctx.Done():
		}
	}()
	defer func() {
		c.mu.Lock()
		delete(c.denied, subj)
		c.mu.Unlock()
	}()
	msg, err := c.nc.RequestWithContext(ctx, subj, env)
	if cause := context.Cause(ctx); err != nil && (errors.Is(cause, nats.ErrPermissionViolation) || errors.Is(cause, errLost)) {
		err = cause
	}
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return fmt.Errorf("%s: no coordinator answers (is fleet-coordinator running and --server right?): %w", verb, err)
	case errors.Is(err, nats.ErrPermissionViolation):
		return fmt.Errorf("%s: these credentials may not call %s (ask an owner for a role that may): %w", verb, subj, err)
	case errors.Is(err, errLost):
		return fmt.Errorf("%s: %w", verb, err)
	case err != nil:
		return fmt.Errorf("%s: %w", verb, err)
	}
	var resp model.Response
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return fmt.Errorf("%s: reply does not decode: %w", verb, err)
	}
	if resp.Error != "" {
		return &APIError{Verb: verb, Code: resp.Code, Msg: resp.Error}
	}
	if out != nil {
		if err := json.Unmarshal(resp.Data, out); err != nil {
			return fmt.Errorf("%s: reply data does not decode: %w", verb, err)
		}
	}
	return nil
}

// Token verbs.

// CreateToken creates an enrollment token.
func (c *Client) CreateToken(ctx context.Context, a model.TokenCreate) (*model.TokenCreated, error) {
	var out model.TokenCreated
	return &out, c.Call(ctx, subjects.VerbTokenCreate, true, a, &out)
}

// Tokens lists every token, oldest first.
func (c *Client) Tokens(ctx context.Context) ([]model.TokenInfo, error) {
	return ListAll[model.TokenInfo](ctx, c, subjects.VerbTokens, listQuery)
}

// RevokeToken revokes token id.
func (c *Client) RevokeToken(ctx context.Context, id string) (*model.TokenInfo, error) {
	var out model.TokenInfo
	return &out, c.Call(ctx, subjects.VerbTokenRevoke, true, model.TokenRef{ID: id}, &out)
}

// Device verbs.

// Devices lists every device, of one group when group is not empty, by
// name.
func (c *Client) Devices(ctx context.Context, group string) ([]model.DeviceView, error) {
	return ListAll[model.DeviceView](ctx, c, subjects.VerbDevices, func(p model.Page) any {
		return model.DeviceList{Group: group, Page: p}
	})
}

func (c *Client) deviceCall(ctx context.Context, verb string, write bool, args any) (*model.DeviceView, error) {
	var out model.DeviceView
	return &out, c.Call(ctx, verb, write, args, &out)
}

// Device shows the device ref names (ID, ID prefix or name).
func (c *Client) Device(ctx context.Context, ref string) (*model.DeviceView, error) {
	return c.deviceCall(ctx, subjects.VerbDevice, false, model.DeviceRef{Ref: ref})
}

// ApproveDevice approves a pending device.
func (c *Client) ApproveDevice(ctx context.Context, ref string) (*model.DeviceView, error) {
	return c.deviceCall(ctx, subjects.VerbDeviceApprove, true, model.DeviceRef{Ref: ref})
}

// RevokeDevice revokes a device: it is disconnected and refused from now on.
func (c *Client) RevokeDevice(ctx context.Context, ref string) (*model.DeviceView, error) {
	return c.deviceCall(ctx, subjects.VerbDeviceRevoke, true, model.DeviceRef{Ref: ref})
}

// SetDeviceGroups replaces a device's groups.
func (c *Client) SetDeviceGroups(ctx context.Context, ref string, groups []string) (*model.DeviceView, error) {
	return c.deviceCall(ctx, subjects.VerbDeviceGroups, true, model.DeviceGroups{Ref: ref, Groups: groups})
}
