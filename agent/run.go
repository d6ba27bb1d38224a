package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nkeys"

	"fleet/logging"
	"fleet/model"
	"fleet/subjects"
)

// Run runs the agent until SIGINT or SIGTERM.
func (cmd *RunCmd) Run(cli *CLI) error {
	log, err := logging.New(os.Stderr, cli.LogLevel, cli.LogFormat)
	if err != nil {
		return err
	}
	fc, err := LoadFileConfig(string(cli.Config))
	if err != nil {
		return err
	}
	if err := cmd.validate(); err != nil {
		return err
	}
	if err := CheckHost(cmd.StateDir, cmd.CurrentSystem); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	host := cmd.Hostname
	if host == "" {
		if host, err = HostName(); err != nil {
			return err
		}
	}
	token := cmd.EnrollToken
	if token == "" && cmd.EnrollTokenFile != "" {
		b, err := os.ReadFile(cmd.EnrollTokenFile)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("--enroll-token-file: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	if err := os.MkdirAll(cmd.StateDir, 0o700); err != nil {
		return fmt.Errorf("--state-dir: %w", err)
	}
	// Before enrolling, which may wait long for the coordinator.
	if len(cmd.ReleaseSigner) == 0 {
		log.Warn().Msg("no --release-signer configured: every release will be refused")
	}
	creds, err := LoadOrEnroll(ctx, EnrollOptions{Servers: cmd.Server, StateDir: cmd.StateDir, Token: token, Hostname: host, Log: log})
	if errors.Is(err, ErrNoIdentity) && cmd.EnrollToken == "" && cmd.EnrollTokenFile != "" {
		return fmt.Errorf("this device is not enrolled and --enroll-token-file %s does not exist or is empty: put a token from `fleet-admin token create` there", cmd.EnrollTokenFile)
	}
	if err != nil {
		return err
	}
	if creds.Role() == subjects.RolePending {
		eo := EnrollOptions{Servers: cmd.Server, StateDir: cmd.StateDir, Hostname: host, Log: log}
		if creds, err = WaitApproval(ctx, eo, creds, cmd.ApprovalPoll); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
	id := creds.PublicKey()
	log = log.With().Str("device", id).Logger()
	act := &NixOS{Profile: cmd.Profile, CurrentSystem: cmd.CurrentSystem, LogDir: cmd.StateDir, Log: log.With().Str("component", "nix").Logger()}
	act.SystemdRun, act.Systemctl = DetectSystemd()
	host0 := &Host{CurrentSystem: cmd.CurrentSystem, BootedSystem: cmd.BootedSystem, Profile: cmd.Profile}
	ag, err := New(Options{
		DeviceID:        id,
		Hostname:        host,
		Key:             creds.Key,
		Site:            creds.Site(),
		StateDir:        cmd.StateDir,
		ReleaseSigners:  cmd.ReleaseSigner,
		Activator:       act,
		Checks:          NewHealthChecks(fc, log),
		HealthDeadline:  fc.HealthDeadline.Std(5 * time.Minute),
		ReconnectWithin: cmd.ReconnectWithin,
		ApplyTimeout:    cmd.ApplyTimeout,
		FactsInterval:   cmd.FactsInterval,
		Recheck:         cmd.Recheck,
		Facts:           host0.Sources(),
		Log:             log,
		MDM: MDMOptions{Actions: &HostActions{Activator: act, Systemctl: act.Systemctl}, PayloadDir: cmd.PayloadDir,
			RecoveryKeys: cmd.RecoveryKey, EscrowKey: cmd.EscrowKey},
	})
	if err != nil {
		return err
	}
	// A connection nats.go gives up on (the servers refuse the creds: a
	// revoked device) ends the agent with an error that says what to do;
	// systemd restarts it with backoff.
	ctx, refused := context.WithCancelCause(ctx)
	nc, err := Connect(ctx, creds, ConnOptions{Servers: cmd.Server, Name: "fleet-agent " + host, Log: log, OnConnect: ag.OnConnect,
		OnClosed: func(err error) {
			refused(fmt.Errorf("the coordinator closed this device's connection for good (%v): if the device was revoked, "+
				"remove %s and %s and enrol again with a new token", err, filepath.Join(cmd.StateDir, CredsFile), filepath.Join(cmd.StateDir, KeyFile)))
		}})
	if err != nil {
		return err
	}
	defer nc.Close()
	log.Info().Str("version", Version).Str("hostname", host).Msg("fleet-agent running")
	if err := ag.Run(ctx, nc); err != nil {
		return err
	}
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
		return cause
	}
	log.Info().Msg("stopped")
	return nil
}

func (cmd *RunCmd) validate() error {
	for name, d := range map[string]time.Duration{
		"--facts-interval": cmd.FactsInterval, "--reconnect-within": cmd.ReconnectWithin, "--apply-timeout": cmd.ApplyTimeout,
		"--recheck": cmd.Recheck, "--approval-poll": cmd.ApprovalPoll,
	} {
		if d <= 0 {
			return fmt.Errorf("%s must be positive", name)
		}
	}
	if cmd.Hostname != "" {
		if err := model.CheckHostname(cmd.Hostname); err != nil {
			return fmt.Errorf("--hostname: %w", err)
		}
	}
	for _, k := range cmd.ReleaseSigner {
		if strings.HasPrefix(k, "S") {
			if _, err := nkeys.FromSeed([]byte(k)); err == nil {
				return errors.New("--release-signer: a value is a secret seed, not a public key; pass the admin's public key (U...) and keep the seed secret")
			}
		}
		if !nkeys.IsValidPublicUserKey(k) {
			return fmt.Errorf("--release-signer %q is not an admin public key (a U... nkey, as `fleet-admin` prints it)", k)
		}
	}
	return nil
}

// Run prints this device's facts.
func (cmd *FactsCmd) Run(cli *CLI) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h := &Host{CurrentSystem: cmd.CurrentSystem, BootedSystem: cmd.BootedSystem, Profile: cmd.Profile}
	id := ""
	if c, err := LoadCreds(cmd.StateDir); err == nil {
		id = c.PublicKey()
	}
	f := CollectFacts(ctx, id, h.Sources())
	if st, err := LoadState(cmd.StateDir); err == nil {
		f.LastApply = st.Last
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(f)
}
