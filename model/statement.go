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

// The other verbs whose signed requests a device takes as statements.
const (
	verbDeviceGroups  = subjects.VerbDeviceGroups
	verbDevicePin     = subjects.VerbDevicePin
	verbRolloutAction = subjects.VerbRolloutAction
)

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
// signer) that names d's release and, when it names devices, this device
// (a device-pin request is a deploy of its release to its one device); it
// must be no older than the last accepted one. A device that joins a group
// later is brought to the group's target by the older deploy that set it,
// plus d.Join: the admin's newer signed request that put this device in
// that group (or unpinned it). Going back to an older release needs a
// newer signed statement too: a revert (d.Revert, the signed deploy whose
// --on-failure revert undoes last.Release, or an operator's signed undo of
// it), and only to the release this device ran before (last.Before). It
// returns the statement to remember once d is accepted.
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
	at := req.Time
	if d.Join != nil {
		jt, err := joinStatement(d.Join, trusted, self, host, args)
		if err != nil {
			return last, fmt.Errorf("join: %w", err)
		}
		if jt.After(at) {
			at = jt
		}
	}
	next := Statement{Time: at, Release: d.ReleaseID, Before: last.Release}
	if d.ReleaseID == last.Release {
		next.Before = last.Before // the same release again (a retry)
	}
	if !at.Before(last.Time) {
		return next, nil
	}
	if d.Revert == nil {
		return last, fmt.Errorf("%w (signed %s, last %s)", ErrStaleDesired, at.UTC().Format(time.RFC3339), last.Time.UTC().Format(time.RFC3339))
	}
	rtime, undone, err := revertStatement(d.Revert, trusted)
	if err != nil {
		return last, fmt.Errorf("revert: %w", err)
	}
	if undone != last.Release || d.ReleaseID != last.Before || last.Before == "" {
		return last, fmt.Errorf("revert: undoes %q back to %q, but this device accepted %q after %q",
			undone, d.ReleaseID, last.Release, last.Before)
	}
	if rtime.Before(last.Time) {
		return last, fmt.Errorf("revert: %w", ErrStaleDesired)
	}
	return Statement{Time: rtime, Release: d.ReleaseID}, nil
}

// revertStatement reads a signed way back: a deploy that asked to revert
// on failure, or an operator's undo of a rollout (rollout-action undo, or
// abort with revert). It returns its time and the release it undoes.
func revertStatement(s *Signed, trusted []string) (time.Time, string, error) {
	req, err := verifiedRequest(s, trusted)
	if err != nil {
		return time.Time{}, "", err
	}
	switch req.Verb {
	case verbDeploy:
		var args DeployRequest
		if err := json.Unmarshal(req.Args, &args); err != nil {
			return time.Time{}, "", fmt.Errorf("signed deploy: %w", err)
		}
		if args.OnFailure != string(OnFailureRevert) {
			return time.Time{}, "", errors.New("the signed deploy does not ask to revert on failure")
		}
		return req.Time, args.ReleaseID, nil
	case verbRolloutAction:
		var args RolloutRef
		if err := json.Unmarshal(req.Args, &args); err != nil {
			return time.Time{}, "", fmt.Errorf("signed rollout action: %w", err)
		}
		if !args.Reverts() || args.ReleaseID == "" {
			return time.Time{}, "", fmt.Errorf("the signed rollout action %q does not revert a release", args.Action)
		}
		return req.Time, args.ReleaseID, nil
	}
	return time.Time{}, "", fmt.Errorf("signed statement is a %q request, not a deploy or an undo", req.Verb)
}

// Reverts reports whether the action sets the rollout's devices back:
// undo, or abort with revert.
func (a RolloutRef) Reverts() bool {
	return a.Action == RolloutUndo || a.Action == RolloutAbort && a.Revert
}

// Rollout actions of the rollout-action verb.
const (
	RolloutPause  = "pause"
	RolloutResume = "resume"
	RolloutAbort  = "abort"
	RolloutUndo   = "undo"
)

// joinStatement checks d.Join against the deploy it comes with: a trusted
// admin's device-groups request that names this device and puts it in the
// deploy's group, or a device-pin request that names it and unpins it (or
// pins it on this very release). It returns the statement's time.
func joinStatement(s *Signed, trusted []string, self, host string, deploy *DeployRequest) (time.Time, error) {
	req, err := verifiedRequest(s, trusted)
	if err != nil {
		return time.Time{}, err
	}
	switch req.Verb {
	case verbDeviceGroups:
		var args DeviceGroups
		if err := json.Unmarshal(req.Args, &args); err != nil {
			return time.Time{}, fmt.Errorf("signed device-groups: %w", err)
		}
		if args.Ref == "" || !namesDevice([]string{args.Ref}, self, host) {
			return time.Time{}, fmt.Errorf("the signed device-groups names device %q, not this one", args.Ref)
		}
		if deploy.Group != "" && !slices.Contains(args.Groups, deploy.Group) {
			return time.Time{}, fmt.Errorf("the signed device-groups puts this device in %v, not in %q", args.Groups, deploy.Group)
		}
	case verbDevicePin:
		var args DevicePin
		if err := json.Unmarshal(req.Args, &args); err != nil {
			return time.Time{}, fmt.Errorf("signed device-pin: %w", err)
		}
		if args.Ref == "" || !namesDevice([]string{args.Ref}, self, host) {
			return time.Time{}, fmt.Errorf("the signed device-pin names device %q, not this one", args.Ref)
		}
		if args.ReleaseID != "" && args.ReleaseID != deploy.ReleaseID {
			return time.Time{}, fmt.Errorf("the signed device-pin holds this device on %q, not %q", args.ReleaseID, deploy.ReleaseID)
		}
	default:
		return time.Time{}, fmt.Errorf("signed statement is a %q request, not a device-groups or device-pin", req.Verb)
	}
	return req.Time, nil
}

// verifiedRequest checks s's signature against trusted and decodes the
// admin request it carries.
func verifiedRequest(s *Signed, trusted []string) (*Request, error) {
	if err := s.Verify(PurposeAPI, trusted); err != nil {
		return nil, fmt.Errorf("signature: %w", err)
	}
	var req Request
	if err := s.Decode(&req); err != nil {
		return nil, err
	}
	if req.Time.IsZero() {
		return nil, fmt.Errorf("signed %q request has no time", req.Verb)
	}
	return &req, nil
}

// deployStatement reads the signed deploy behind a desired state: a
// deploy request, or a device-pin request, which deploys its release to
// its one device.
func deployStatement(s *Signed, trusted []string) (*Request, *DeployRequest, error) {
	if s == nil {
		return nil, nil, ErrNoStatement
	}
	req, err := verifiedRequest(s, trusted)
	if err != nil {
		return nil, nil, fmt.Errorf("signed deploy: %w", err)
	}
	var args DeployRequest
	switch req.Verb {
	case verbDeploy:
		if err := json.Unmarshal(req.Args, &args); err != nil {
			return nil, nil, fmt.Errorf("signed deploy: %w", err)
		}
	case verbDevicePin:
		var pin DevicePin
		if err := json.Unmarshal(req.Args, &pin); err != nil {
			return nil, nil, fmt.Errorf("signed device-pin: %w", err)
		}
		if pin.ReleaseID == "" || pin.Ref == "" {
			return nil, nil, errors.New("the signed device-pin unpins: it deploys nothing")
		}
		args = DeployRequest{ReleaseID: pin.ReleaseID, Devices: []string{pin.Ref}}
	default:
		return nil, nil, fmt.Errorf("signed statement is a %q request, not a deploy", req.Verb)
	}
	return req, &args, nil
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
