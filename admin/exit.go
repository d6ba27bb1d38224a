package admin

import (
	"context"
	"errors"

	"github.com/nats-io/nats.go"

	"fleet/internal/natsdial"
	"fleet/model"
)

// Exit codes of fleet-admin, for CI jobs and scripts (README: Exit codes).
const (
	ExitOK          = 0
	ExitError       = 1
	ExitUsage       = 2
	ExitPaused      = 3 // deploy --wait / rollout watch: the rollout paused
	ExitFailed      = 4 // deploy --wait / rollout watch: the rollout failed, was aborted or reverted
	ExitUnreachable = 5 // the coordinator could not be reached, or was lost
	ExitDenied      = 6 // not authorised: credentials refused, or the role may not do this
	ExitInterrupted = 130
)

// codedError carries the exit code of an error.
type codedError struct {
	code int
	err  error
}

func (e *codedError) Error() string { return e.err.Error() }
func (e *codedError) Unwrap() error { return e.err }

// withCode gives err an exit code.
func withCode(code int, err error) error {
	if err == nil {
		return nil
	}
	return &codedError{code: code, err: err}
}

// usageError is a mistake in the command line that kong cannot see.
func usageError(err error) error { return withCode(ExitUsage, err) }

// exitCode maps an error to fleet-admin's exit code.
func exitCode(ctx context.Context, err error) int {
	if err == nil {
		return ExitOK
	}
	var ce *codedError
	if errors.As(err, &ce) {
		return ce.code
	}
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return ExitInterrupted
	}
	var de *natsdial.Error
	if errors.As(err, &de) {
		if de.Kind == natsdial.Auth {
			return ExitDenied
		}
		return ExitUnreachable
	}
	var ae *APIError
	if errors.As(err, &ae) && ae.Code == model.CodeRefused {
		return ExitDenied
	}
	switch {
	case errors.Is(err, nats.ErrPermissionViolation), errors.Is(err, nats.ErrAuthorization):
		return ExitDenied
	case errors.Is(err, nats.ErrNoResponders), errors.Is(err, nats.ErrConnectionClosed), errors.Is(err, errLost):
		return ExitUnreachable
	}
	return ExitError
}

// isCode reports whether err is the coordinator's error reply with code.
func isCode(err error, code string) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Code == code
}
