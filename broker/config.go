package broker

import (
	"fmt"
	"net"
	"net/url"
	"strconv"
	"time"

	"fleet/accounts"
	"fleet/subjects"
)

// Config is the coordinator's configuration. The CLI fills it from flags,
// FLEET_* environment variables and a JSON config file.
type Config struct {
	DataDir        string
	Listen         string // host:port for NATS clients
	HTTP           string // host:port for /metrics, /healthz, /readyz; "" disables
	LeafnodeListen string // host:port for leaf nodes; "" disables
	ServerName     string
	Domain         string // JetStream domain

	// ClusterName, ClusterListen and Routes join coordinators into a
	// cluster: ClusterListen "" runs alone; Routes are the other
	// coordinators' cluster addresses (nats-route://host:port).
	ClusterName   string
	ClusterListen string
	Routes        []string

	// Pprof serves Go's profiles under /debug/pprof/ on HTTP (loopback
	// only: they reveal the process's internals).
	Pprof bool

	// Replicas is the replica count of every stream and bucket (1 alone,
	// 3 in a cluster).
	Replicas int
	// FactsRetention and FactsHistory bound FLEET_FACTS: by age, and by
	// reports kept per device.
	FactsRetention time.Duration
	FactsHistory   int64
	// EventsRetention bounds FLEET_EVENTS by age.
	EventsRetention time.Duration
	// APITokenFile holds the bearer token of /api/v1/...; "" leaves the
	// API disabled (403).
	APITokenFile string

	Limits accounts.Limits
}

// DefaultConfig is the embedded default: one coordinator, everything local.
func DefaultConfig() Config {
	return Config{
		DataDir:         "fleet-data",
		Listen:          "0.0.0.0:4222",
		HTTP:            "127.0.0.1:9465",
		Domain:          subjects.Domain,
		ClusterName:     "fleet",
		Replicas:        1,
		FactsRetention:  30 * 24 * time.Hour,
		FactsHistory:    1440,
		EventsRetention: 90 * 24 * time.Hour,
		Limits:          accounts.DefaultLimits,
	}
}

// Validate checks values that would otherwise fail deep inside the server.
// Errors name the flag to fix.
func (c *Config) Validate() error {
	if c.DataDir == "" {
		return fmt.Errorf("--data-dir must not be empty")
	}
	if _, _, err := splitHostPort(c.Listen); err != nil {
		return fmt.Errorf("--listen %q: %w", c.Listen, err)
	}
	if c.HTTP != "" {
		if _, _, err := splitHostPort(c.HTTP); err != nil {
			return fmt.Errorf("--http %q: %w", c.HTTP, err)
		}
	}
	if c.LeafnodeListen != "" {
		if _, _, err := splitHostPort(c.LeafnodeListen); err != nil {
			return fmt.Errorf("--leafnode-listen %q: %w", c.LeafnodeListen, err)
		}
	}
	if err := c.checkPortClash(); err != nil {
		return err
	}
	if c.Domain == "" || !validToken(c.Domain) {
		return fmt.Errorf("--domain %q: must be one word of letters, digits, - or _", c.Domain)
	}
	if c.ServerName != "" && !validToken(c.ServerName) {
		return fmt.Errorf("--server-name %q: must be one word of letters, digits, - or _", c.ServerName)
	}
	if c.Replicas != 1 && c.Replicas != 3 && c.Replicas != 5 {
		return fmt.Errorf("--replicas %d: use 1 (single coordinator), 3 or 5 (cluster)", c.Replicas)
	}
	if err := c.validateCluster(); err != nil {
		return err
	}
	if c.FactsRetention <= 0 {
		return fmt.Errorf("--facts-retention must be positive")
	}
	if c.FactsHistory <= 0 {
		return fmt.Errorf("--facts-history must be positive")
	}
	if c.EventsRetention <= 0 {
		return fmt.Errorf("--events-retention must be positive")
	}
	if c.Limits.JetStreamDisk < 1<<30 {
		return fmt.Errorf("--storage-gib must be at least 1")
	}
	// The server's limit is an int32 and at most 64 MiB.
	if c.Limits.MaxPayload <= 0 || c.Limits.MaxPayload > 64<<20 {
		return fmt.Errorf("max payload %d: must be from 1 byte to 64 MiB", c.Limits.MaxPayload)
	}
	return nil
}

// checkPortClash refuses two listeners on one port: the second would fail
// inside the server, with an error that names no flag.
func (c *Config) checkPortClash() error {
	type addr struct {
		flag, hp, host string
		port           int
	}
	var seen []addr
	for _, a := range []struct{ flag, hp string }{
		{"--listen", c.Listen}, {"--http", c.HTTP}, {"--leafnode-listen", c.LeafnodeListen},
		{"--cluster-listen", c.ClusterListen},
	} {
		if a.hp == "" {
			continue
		}
		host, port, _ := splitHostPort(a.hp)
		if port == 0 {
			continue
		}
		for _, b := range seen {
			if b.port == port && (host == b.host || anyHost(host) || anyHost(b.host)) {
				return fmt.Errorf("%s %q: port %d is already used by %s %q", a.flag, a.hp, port, b.flag, b.hp)
			}
		}
		seen = append(seen, addr{a.flag, a.hp, host, port})
	}
	return nil
}

func anyHost(h string) bool { return h == "0.0.0.0" || h == "::" || h == "" }

// splitHostPort parses host:port with a numeric port (0 picks a free one).
func splitHostPort(hp string) (string, int, error) {
	host, ps, err := net.SplitHostPort(hp)
	if err != nil {
		return "", 0, fmt.Errorf("want host:port, e.g. 0.0.0.0:4222")
	}
	port, err := strconv.Atoi(ps)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("port %q is not a number from 0 to 65535", ps)
	}
	if host == "" {
		host = "0.0.0.0"
	}
	return host, port, nil
}

func validToken(s string) bool {
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return s != ""
}

// Clustered reports whether the coordinator joins a cluster.
func (c *Config) Clustered() bool { return c.ClusterListen != "" }

// validateCluster checks the cluster flags: routes need a cluster listener,
// and every coordinator of a cluster needs its own server name (JetStream
// peers and the rollout engine's lock owner are told apart by it).
func (c *Config) validateCluster() error {
	if !c.Clustered() {
		if len(c.Routes) > 0 {
			return fmt.Errorf("--routes needs --cluster-listen (this coordinator's own cluster address)")
		}
		return nil
	}
	if _, _, err := splitHostPort(c.ClusterListen); err != nil {
		return fmt.Errorf("--cluster-listen %q: %w", c.ClusterListen, err)
	}
	if c.ClusterName == "" || !validToken(c.ClusterName) {
		return fmt.Errorf("--cluster-name %q: must be one word of letters, digits, - or _", c.ClusterName)
	}
	if c.ServerName == "" {
		return fmt.Errorf("--server-name is required with --cluster-listen: give each coordinator of the cluster its own name")
	}
	for _, r := range c.Routes {
		u, err := url.Parse(r)
		if err != nil || u.Scheme != "nats-route" && u.Scheme != "nats" || u.Host == "" || u.Port() == "" {
			return fmt.Errorf("--routes %q: want nats-route://host:port", r)
		}
	}
	return nil
}
