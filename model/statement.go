package model

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nkeys"

	"fleet/subjects"
)

// SignRequest builds the signed envelope of an admin API request for verb
// with args, at time at.
func SignRequest(kp nkeys.KeyPair, verb string, args any, at time.Time) (Signed, error) {
	var nonce [16]byte
	_, _ = rand.Read(nonce[:])
	req := Request{Verb: verb, Time: at.UTC(), Nonce: base64.RawURLEncoding.EncodeToString(nonce[:])}
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return Signed{}, fmt.Errorf("encode arguments: %w", err)
		}
		req.Args = b
	}
	return Sign(kp, PurposeAPI, req)
}

// verbDeploy is subjects.VerbDeploy: the admin API verb whose signed
// request authorises a desired state.
const verbDeploy = subjects.VerbDeploy

// Statement is what an agent remembers of the admin statements behind the
// desired states it accepted, to refuse older ones (rollback protection).
type Statement struct {
	// Time is the newest accepted statement's signing time.
	Time time.Time `json:"time,omitzero"`
	// Release is the release the last accepted desired state named, and
	// Before the one accepted before it: a revert may return from Release
	// to Before, and only there.
	Release string `json:"release,omitempty"`
	Before  string `json:"before,omitempty"`
}

// Errors of CheckStatement.
var (
	ErrNoStatement  = errors.New("the desired state carries no deploy signed by an admin")
	ErrStaleDesired = errors.New("the desired state is older than the last one this device accepted")
)

// CheckStatement decides whether device self (host name host) may take
// desired state d, given the statement of the last one it accepted. A
// desired state must carry the admin's signed deploy request (by a trusted
// signer) that names d's release and, when it names devices, this device;
// it must be no older than the last accepted one. Going back to an older
// release needs a newer signed statement too: a revert (d.Revert, the
// signed deploy whose --on-failure revert undoes last.Release), and only to
// the release this device ran before (last.Before). It returns the
// statement to remember once d is accepted.
func CheckStatement(d *Desired, self, host string, trusted []string, last Statement) (Statement, error) {
	req, args, err := deployStatement(d.Deploy, trusted)
	if err != nil {
		return last, err
	}
	if args.ReleaseID != d.ReleaseID {
		return last, fmt.Errorf("the signed deploy names release %q, the desired state %q", args.ReleaseID, d.ReleaseID)
	}
	if !namesDevice(args.Devices, self, host) {
		return last, fmt.Errorf("the signed deploy of %s names devices %v, not this one", args.ReleaseID, args.Devices)
	}
	next := Statement{Time: req.Time, Release: d.ReleaseID, Before: last.Release}
	if d.ReleaseID == last.Release {
		next.Before = last.Before // the same release again (a retry)
	}
	if !req.Time.Before(last.Time) {
		return next, nil
	}
	if d.Revert == nil {
		return last, fmt.Errorf("%w (signed %s, last %s)", ErrStaleDesired, req.Time.UTC().Format(time.RFC3339), last.Time.UTC().Format(time.RFC3339))
	}
	rreq, rargs, err := deployStatement(d.Revert, trusted)
	if err != nil {
		return last, fmt.Errorf("revert: %w", err)
	}
	if rargs.OnFailure != string(OnFailureRevert) {
		return last, errors.New("revert: the signed deploy does not ask to revert on failure")
	}
	if rargs.ReleaseID != last.Release || d.ReleaseID != last.Before || last.Before == "" {
		return last, fmt.Errorf("revert: undoes %q back to %q, but this device accepted %q after %q",
			rargs.ReleaseID, d.ReleaseID, last.Release, last.Before)
	}
	if rreq.Time.Before(last.Time) {
		return last, fmt.Errorf("revert: %w", ErrStaleDesired)
	}
	return Statement{Time: rreq.Time, Release: d.ReleaseID}, nil
}

func deployStatement(s *Signed, trusted []string) (*Request, *DeployRequest, error) {
	if s == nil {
		return nil, nil, ErrNoStatement
	}
	if err := s.Verify(PurposeAPI, trusted); err != nil {
		return nil, nil, fmt.Errorf("signed deploy: %w", err)
	}
	var req Request
	if err := s.Decode(&req); err != nil {
		return nil, nil, fmt.Errorf("signed deploy: %w", err)
	}
	if req.Verb != verbDeploy || req.Time.IsZero() {
		return nil, nil, fmt.Errorf("signed statement is a %q request, not a deploy", req.Verb)
	}
	var args DeployRequest
	if err := json.Unmarshal(req.Args, &args); err != nil {
		return nil, nil, fmt.Errorf("signed deploy: %w", err)
	}
	return &req, &args, nil
}

// namesDevice: a deploy to a group names no devices (the coordinator
// resolves membership); one to devices must name this one, by ID, unique
// ID prefix or host name, as fleet-admin accepts them.
func namesDevice(refs []string, self, host string) bool {
	if len(refs) == 0 {
		return true
	}
	return slices.ContainsFunc(refs, func(r string) bool {
		return r == self || (host != "" && r == host) || (len(r) >= 8 && strings.HasPrefix(self, r))
	})
}
