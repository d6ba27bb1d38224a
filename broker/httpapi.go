package broker

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
)

// The read-only JSON API on the coordinator's HTTP listener, for Grafana's
// Infinity data source and scripts:
//
//	GET /api/v1/devices[?group=G]  device status rows (model.DeviceStatusRow)
//	GET /api/v1/rollouts           rollout summaries (model.RolloutStatusRow)
//
// It answers only with a bearer token: --api-token-file names a file whose
// content (trimmed) is the token. Without it the endpoints answer 403 and
// say how to enable them: the listener may be reachable by other local
// users, and device names and store paths are not for everyone. /metrics,
// /healthz and /readyz need no token; keep --http on loopback (the default)
// or behind a proxy when that matters.

// loadAPIToken reads the token file; "" path means the API is off.
func loadAPIToken(path string) ([]byte, error) {
	if path == "" {
		return nil, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--api-token-file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if len(tok) < 16 {
		return nil, fmt.Errorf("--api-token-file %s: the token must be at least 16 characters (e.g. openssl rand -hex 32 > %s)", path, path)
	}
	sum := sha256.Sum256([]byte(tok))
	return sum[:], nil
}

// requireToken wraps h with the bearer-token check. tokenHash is the
// SHA-256 of the token (nil: API disabled).
func requireToken(tokenHash []byte, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if tokenHash == nil {
			http.Error(w, "the fleet API is disabled: start fleet-coordinator with --api-token-file FILE (env FLEET_API_TOKEN_FILE) and send Authorization: Bearer <token>", http.StatusForbidden)
			return
		}
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		sum := sha256.Sum256([]byte(strings.TrimSpace(got)))
		if !ok || subtle.ConstantTimeCompare(sum[:], tokenHash) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="fleet"`)
			http.Error(w, "missing or wrong bearer token", http.StatusUnauthorized)
			return
		}
		h(w, r)
	}
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	_ = enc.Encode(v)
}

// mountVisibility adds /metrics and the JSON API to mux.
func (c *Coordinator) mountVisibility(mux *http.ServeMux) {
	mux.Handle("GET /metrics", metricsHandler(c.metrics))
	mux.HandleFunc("GET /api/v1/devices", requireToken(c.apiToken, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, c.Status(r.URL.Query().Get("group")).Devices)
	}))
	mux.HandleFunc("GET /api/v1/rollouts", requireToken(c.apiToken, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, c.Rollouts())
	}))
}
