package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/internal/natsdial"
	"fleet/model"
	"fleet/subjects"
)

// EnrollOptions are what a device needs to enrol.
type EnrollOptions struct {
	Servers  []string
	StateDir string
	// Token is the enrollment token (fleet-admin token create).
	Token    string
	Hostname string
	Log      zerolog.Logger
	// Facts, when set, are sent with the request as the first report.
	Facts *model.Facts
	// RequestTimeout bounds one enrollment request (default 10s).
	RequestTimeout time.Duration
}

// ErrEnrollRefused wraps a definitive refusal by the coordinator (bad,
// expired, used-up or revoked token, revoked key): retrying cannot help.
var ErrEnrollRefused = errors.New("enrollment refused")

// LoadOrEnroll returns the device's creds from STATE_DIR/agent.creds, or,
// on first start, enrols with o.Token and writes them there. Without creds
// and without a token it returns ErrNoIdentity.
func LoadOrEnroll(ctx context.Context, o EnrollOptions) (*accounts.Creds, error) {
	c, err := LoadCreds(o.StateDir)
	if err == nil || !IsNotEnrolled(err) {
		return c, err
	}
	if o.Token == "" {
		return nil, ErrNoIdentity
	}
	return Enroll(ctx, o)
}

// Enroll enrols the device with o.Token: it creates (or reuses) the device
// keys in STATE_DIR, asks the coordinator for credentials, proving it holds
// the key, and writes STATE_DIR/agent.creds. It retries with backoff while
// the coordinator cannot be reached, until ctx ends; a refusal returns at
// once with ErrEnrollRefused.
func Enroll(ctx context.Context, o EnrollOptions) (*accounts.Creds, error) {
	tok, err := model.ParseToken(o.Token)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrEnrollRefused, err)
	}
	host := o.Hostname
	if host == "" {
		if host, err = HostName(); err != nil {
			return nil, err
		}
	}
	if err := model.CheckHostname(host); err != nil {
		return nil, fmt.Errorf("%w (pass --hostname)", err)
	}
	kp, err := loadOrCreateKey(filepath.Join(o.StateDir, KeyFile), nkeys.PrefixByteUser, nkeys.CreateUser)
	if err != nil {
		return nil, err
	}
	kp = accounts.FastKey(kp) // named and signed with more than once below
	xk, err := loadOrCreateKey(filepath.Join(o.StateDir, XKeyFile), nkeys.PrefixByteCurve, nkeys.CreateCurveKeys)
	if err != nil {
		return nil, err
	}
	pub, _ := kp.PublicKey()
	xpub, _ := xk.PublicKey()
	timeout := o.RequestTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	log := o.Log.With().Str("device", pub).Str("token", tok.ID).Logger()

	for attempt := 0; ; attempt++ {
		jwtStr, err := requestEnroll(ctx, o.Servers, tok, kp, model.EnrollRequest{
			TokenID: tok.ID, Secret: tok.Secret, XKey: xpub, Hostname: host, Facts: o.Facts,
		}, timeout)
		if err == nil {
			creds := &accounts.Creds{JWT: jwtStr, Key: kp}
			if err := accounts.WriteCreds(filepath.Join(o.StateDir, CredsFile), creds); err != nil {
				return nil, err
			}
			log.Info().Msg("enrolled")
			return creds, nil
		}
		if errors.Is(err, ErrEnrollRefused) || ctx.Err() != nil {
			return nil, err
		}
		d := backoff(attempt)
		log.Warn().Err(err).Dur("retry_in", d).Msg("enrollment failed; retrying")
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("enrollment: %w (last error: %v)", ctx.Err(), err)
		case <-time.After(d):
		}
	}
}

// requestEnroll connects with the token's bearer credential and sends one
// signed request. Errors wrapping ErrEnrollRefused are final.
func requestEnroll(ctx context.Context, servers []string, tok *model.ParsedToken, kp nkeys.KeyPair, req model.EnrollRequest, timeout time.Duration) (string, error) {
	url := serversURL(servers)
	dialer := &natsdial.Dialer{}
	nc, err := nats.Connect(url, dialer.Option(),
		// A bearer JWT needs no signature of the server's nonce.
		nats.UserJWT(func() (string, error) { return tok.JWT, nil }, func([]byte) ([]byte, error) { return nil, nil }),
		nats.CustomInboxPrefix(tok.InboxPrefix()),
		nats.Name("fleet-agent-enroll"),
		nats.Timeout(timeout),
		nats.NoReconnect(),
	)
	if err != nil {
		if errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthExpired) || errors.Is(err, nats.ErrAuthRevoked) {
			return "", fmt.Errorf("%w: the server refused the token's credential (%v): the token expired or was revoked; create a new one with fleet-admin token create", ErrEnrollRefused, err)
		}
		return "", dialer.Explain(err, url, "check --server")
	}
	defer nc.Close()
	return sendEnroll(ctx, nc, kp, req, timeout)
}

func serversURL(servers []string) string {
	if len(servers) > 0 {
		return joinURLs(servers)
	}
	return nats.DefaultURL
}

// sendEnroll sends one signed enrollment request on nc and returns the
// user JWT of the answer. Errors wrapping ErrEnrollRefused are final.
func sendEnroll(ctx context.Context, nc *nats.Conn, kp nkeys.KeyPair, req model.EnrollRequest, timeout time.Duration) (string, error) {
	// Sign afresh on every attempt: the time must be current.
	req.Time = time.Now().UTC()
	signed, err := model.Sign(kp, model.PurposeEnroll, req)
	if err != nil {
		return "", err
	}
	body, _ := json.Marshal(signed)
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	msg, err := nc.RequestWithContext(rctx, subjects.Enroll, body)
	if err != nil {
		if errors.Is(err, nats.ErrNoResponders) {
			return "", fmt.Errorf("no coordinator answers %s yet: %w", subjects.Enroll, err)
		}
		return "", fmt.Errorf("enrollment request: %w", err)
	}
	var resp model.EnrollResponse
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return "", fmt.Errorf("enrollment reply does not decode: %w", err)
	}
	if resp.Error != "" {
		if resp.Code == model.CodeInternal {
			return "", fmt.Errorf("coordinator: %s", resp.Error)
		}
		return "", fmt.Errorf("%w: %s", ErrEnrollRefused, resp.Error)
	}
	pub, _ := kp.PublicKey()
	uc, err := jwt.DecodeUserClaims(resp.JWT)
	if err != nil || uc.Subject != pub {
		return "", fmt.Errorf("%w: the coordinator answered with credentials for another key", ErrEnrollRefused)
	}
	return resp.JWT, nil
}

// DefaultApprovalPoll is how often a pending device asks whether it was
// approved.
const DefaultApprovalPoll = 30 * time.Second

// WaitApproval keeps asking, with the pending creds in STATE_DIR, whether
// this device was approved, every poll (with jitter), until an admin
// approves it (`fleet-admin devices approve`): then it writes and returns
// the device's agent creds. Pending creds can do nothing else.
func WaitApproval(ctx context.Context, o EnrollOptions, creds *accounts.Creds, poll time.Duration) (*accounts.Creds, error) {
	if poll <= 0 {
		poll = DefaultApprovalPoll
	}
	timeout := o.RequestTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	xk, err := loadOrCreateKey(filepath.Join(o.StateDir, XKeyFile), nkeys.PrefixByteCurve, nkeys.CreateCurveKeys)
	if err != nil {
		return nil, err
	}
	xpub, _ := xk.PublicKey()
	host := o.Hostname
	if host == "" {
		if host, err = HostName(); err != nil {
			return nil, err
		}
	}
	log := o.Log.With().Str("device", creds.PublicKey()).Logger()
	log.Info().Msg("waiting for approval: an admin approves this device with `fleet-admin devices approve`")
	// One connection for the whole wait: the device shows online while
	// pending, and reconnects like a running agent.
	nc, err := Connect(ctx, creds, ConnOptions{Servers: o.Servers, Name: "fleet-agent-pending " + host, Log: log})
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	for {
		var jwtStr string
		err := errors.New("not connected")
		if nc.IsConnected() {
			jwtStr, err = sendEnroll(ctx, nc, creds.Key, model.EnrollRequest{XKey: xpub, Hostname: host}, timeout)
		}
		if err == nil {
			next := &accounts.Creds{JWT: jwtStr, Key: creds.Key}
			if next.Role() != subjects.RolePending {
				if err := accounts.WriteCreds(filepath.Join(o.StateDir, CredsFile), next); err != nil {
					return nil, err
				}
				log.Info().Msg("approved")
				return next, nil
			}
			log.Debug().Msg("still waiting for approval")
		} else if errors.Is(err, ErrEnrollRefused) {
			return nil, fmt.Errorf("waiting for approval: %w", err)
		} else if ctx.Err() == nil {
			log.Debug().Err(err).Msg("cannot ask whether this device was approved yet")
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(poll*9/10 + rand.N(poll/5+1)):
		}
	}
}

// loadOrCreateKey reuses the key at path, so an enrollment retried after a
// crash asks for the same key, or creates it (0600).
func loadOrCreateKey(path string, prefix nkeys.PrefixByte, create func() (nkeys.KeyPair, error)) (nkeys.KeyPair, error) {
	if b, err := os.ReadFile(path); err == nil {
		if prefix == nkeys.PrefixByteCurve {
			// accounts.ReadSeed parses decorated user seeds, not curve seeds.
			kp, err := nkeys.FromCurveSeed(bytes.TrimSpace(b))
			if err != nil {
				return nil, fmt.Errorf("key file %s is damaged: %w (remove it and enrol again)", path, err)
			}
			return kp, nil
		}
		return accounts.ReadSeed(path, prefix)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("key %s: %w", path, err)
	}
	kp, err := create()
	if err != nil {
		return nil, fmt.Errorf("create key %s: %w", path, err)
	}
	if err := accounts.WriteSeed(path, kp); err != nil {
		return nil, err
	}
	return kp, nil
}

// HostName is this host's name as NixOS's networking.hostName has it: the
// first label of a fully qualified name.
func HostName() (string, error) {
	h, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("hostname: %w (pass --hostname)", err)
	}
	h, _, _ = strings.Cut(h, ".")
	return h, nil
}
