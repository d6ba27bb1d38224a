// Package broker is the fleet coordinator: an embedded NATS server with
// JetStream in operator mode, the streams and buckets that hold the fleet's
// state, and the services built on them.
package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"fleet/accounts"
	"fleet/internal/dirlock"
	"fleet/logging"
	"fleet/subjects"
)

// Coordinator is a running coordinator.
type Coordinator struct {
	cfg  Config
	log  zerolog.Logger
	auth *accounts.Authority
	ns   *server.Server

	// nc is the coordinator's own in-process CORE connection (the state:
	// every stream and bucket); fc its FLEET connection, the only one that
	// hears clients (requests, reports) and speaks to them (replies,
	// triggers); sys its system-account connection (account updates,
	// connection events). No client can reach CORE: these handlers are the
	// only bridge.
	nc *nats.Conn
	fc *nats.Conn
	// engineNC and indexNC are the rollout engine's and the device
	// index's own CORE connections.
	engineNC, indexNC *nats.Conn
	engineJS, indexJS jetstream.JetStream
	sys               *nats.Conn
	js                jetstream.JetStream
	// svc are enrollment, the admin API and presence (services.go).
	svc *services

	// revocations is fleet_revocations, the authority on revoked keys;
	// revMu orders this coordinator's re-signs and pushes of the FLEET
	// account; stopWatch ends the bucket's watcher.
	revocations jetstream.KeyValue
	revMu       sync.Mutex
	// revPending: the last sync of the revocations failed (revMu).
	revPending bool
	// pushHook, when set, pushes account JWTs in place of PushAccount
	// (tests make a push fail).
	pushHook  func(ctx context.Context, tok string) error
	stopWatch context.CancelFunc

	// stop ends the rollout engine; engineDone is closed once it has
	// (and released its lock).
	stop       context.CancelFunc
	engineDone chan struct{}
	rollouts   *rollouts

	// index is the device index behind /metrics, the JSON API and Status;
	// metrics is what /metrics serves: its own registry and the index.
	index    *deviceIndex
	metrics  metricsGatherer
	apiToken []byte // SHA-256 of the API bearer token; nil: API disabled

	httpLn  net.Listener
	httpSrv *http.Server

	// lock holds the data dir for this process's life.
	lock *dirlock.Lock

	ready    atomic.Bool
	fatal    atomic.Pointer[string]
	closeOne sync.Once
	done     chan struct{}
}

// Init creates the identity of a new fleet in cfg.DataDir. It holds the
// data dir while it works: a coordinator running on it refuses it.
func Init(cfg Config) (*accounts.Authority, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	lock, err := lockDataDir(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	defer lock.Release()
	return initDataDir(cfg)
}

// lockDataDir holds dir for this process: a data dir belongs to one
// running coordinator (two would both lead the rollout engine and corrupt
// the streams).
func lockDataDir(dir string) (*dirlock.Lock, error) {
	l, err := dirlock.Acquire(dir)
	if errors.Is(err, dirlock.ErrBusy) {
		return nil, fmt.Errorf("data dir %w (another fleet-coordinator runs on it): stop it, or give this one its own --data-dir", err)
	}
	return l, err
}

// initDataDir creates the identity of a new fleet in cfg.DataDir, which the
// caller holds.
func initDataDir(cfg Config) (*accounts.Authority, error) {
	// JetStream data without keys belongs to a fleet whose identity was
	// lost: a new identity would orphan it, so refuse like for the keys.
	if js := filepath.Join(cfg.DataDir, jetstreamDir); exists(js) {
		return nil, fmt.Errorf("%s already exists: %s holds another fleet's data (use a new --data-dir, or restore the rest of this one)", js, cfg.DataDir)
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir %s: %w", cfg.DataDir, err)
	}
	return accounts.Create(cfg.DataDir, cfg.Domain, cfg.Limits)
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// loadOrInit loads the data dir, initialising it when it is new or empty.
func loadOrInit(cfg Config, log zerolog.Logger) (*accounts.Authority, bool, error) {
	if accounts.Initialized(cfg.DataDir) {
		a, err := accounts.Load(cfg.DataDir, cfg.Domain, cfg.Limits)
		return a, false, err
	}
	entries, err := os.ReadDir(cfg.DataDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, false, fmt.Errorf("read data dir %s: %w", cfg.DataDir, err)
	}
	for _, e := range entries {
		switch e.Name() {
		case accounts.OperatorSeedFile, accounts.AdminCredsFile, accounts.KeysDir, accounts.ResolverDir, jetstreamDir:
			return nil, false, fmt.Errorf("data dir %s is partial: %s exists but %s is missing (restore the dir from a backup, or move it away and start fresh)",
				cfg.DataDir, filepath.Join(cfg.DataDir, e.Name()), filepath.Join(cfg.DataDir, accounts.OperatorJWTFile))
		}
	}
	log.Info().Str("data_dir", cfg.DataDir).Msg("initialising a new fleet")
	a, err := initDataDir(cfg)
	return a, true, err
}

const jetstreamDir = "jetstream"

// Start runs a coordinator until ctx ends or Close is called. It returns once
// the server accepts clients and every stream and bucket exists.
func Start(ctx context.Context, cfg Config, log zerolog.Logger) (*Coordinator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	c := &Coordinator{cfg: cfg, log: log, done: make(chan struct{})}
	var err error
	if c.apiToken, err = loadAPIToken(cfg.APITokenFile); err != nil {
		return nil, err
	}

	// Listen checks first, before the data dir is touched: the server
	// reports a busy port only through its logger, so catch it here with a
	// message that names the flag.
	if err := checkFree(cfg.Listen, "--listen"); err != nil {
		return nil, err
	}
	if cfg.LeafnodeListen != "" {
		if err := checkFree(cfg.LeafnodeListen, "--leafnode-listen"); err != nil {
			return nil, err
		}
	}
	if cfg.ClusterListen != "" {
		if err := checkFree(cfg.ClusterListen, "--cluster-listen"); err != nil {
			return nil, err
		}
	}
	if cfg.HTTP != "" {
		ln, err := net.Listen("tcp", cfg.HTTP)
		if err != nil {
			return nil, fmt.Errorf("--http %s: cannot listen: %w (pick another address or stop what uses it)", cfg.HTTP, err)
		}
		c.httpLn = ln
	}
	// Then, before anything in it is opened: a data dir another
	// coordinator runs on is refused.
	if c.lock, err = lockDataDir(cfg.DataDir); err != nil {
		c.Close()
		return nil, err
	}

	auth, fresh, err := loadOrInit(cfg, log)
	if err != nil {
		c.Close()
		return nil, err
	}
	if !fresh {
		if changed, err := auth.Refresh(); err != nil {
			c.Close()
			return nil, err
		} else if changed {
			log.Info().Msg("FLEET account JWT updated to this version's roles and limits")
		}
	}
	c.auth = auth

	if err := c.startServer(); err != nil {
		c.Close()
		return nil, err
	}
	if err := c.connect(); err != nil {
		c.Close()
		return nil, err
	}
	if err := c.waitJetStream(ctx); err != nil {
		c.Close()
		return nil, err
	}
	if err := c.ensureStreams(ctx); err != nil {
		c.Close()
		return nil, err
	}
	// Revocations before the services: enrollment checks them.
	wctx, cancel := context.WithCancel(context.Background())
	c.stopWatch = cancel
	if err := c.retryInCluster(ctx, func() error { return c.startRevocations(wctx) }); err != nil {
		c.Close()
		return nil, err
	}
	// The API serves rollouts, so their store exists before the API starts.
	if err := c.retryInCluster(ctx, func() (err error) {
		c.rollouts, err = newRollouts(ctx, c.engineJS, c.instanceName(), c.log.With().Str("component", "rollouts").Logger())
		return err
	}); err != nil {
		c.Close()
		return nil, err
	}
	// The index exists before the handlers that consult it start; it is
	// fed from startEngine on (until then it knows no device, and the
	// handlers read the bucket).
	c.index = newDeviceIndex(c.log.With().Str("component", "index").Logger())
	if err := c.startServices(ctx); err != nil {
		c.Close()
		return nil, err
	}
	c.rollouts.notify = c.svc
	c.rollouts.index = c.index
	if err := c.startEngine(); err != nil {
		c.Close()
		return nil, err
	}
	c.ready.Store(true)
	if c.httpLn != nil {
		c.startHTTP()
	}
	go func() {
		select {
		case <-ctx.Done():
			c.Close()
		case <-c.done:
		}
	}()
	return c, nil
}

// startEngine starts the rollout engine (it leads while it holds the lock)
// and the device index behind metrics and status.
func (c *Coordinator) startEngine() error {
	runCtx, cancel := context.WithCancel(context.Background())
	c.stop = cancel
	c.engineDone = make(chan struct{})
	go func() {
		defer close(c.engineDone)
		c.rollouts.Run(runCtx)
	}()
	if err := c.index.run(runCtx, c.indexJS); err != nil {
		return fmt.Errorf("device index: %w", err)
	}
	// Online status comes from the server's connect events.
	c.SetOnlineSource(c.svc.presence)
	reg := newMetricsRegistry(c.ns, c.auth.CoreAccount())
	reg.MustRegister(c.svc.dropped, c.svc.traffic, c.svc.auditSuppressed, c.newMDMCollector(), c.svc.cache.collector())
	c.metrics = newMetricsGatherer(reg, fleetCollector{x: c.index})
	return nil
}

// instanceName names this coordinator stably across restarts (lock owner).
func (c *Coordinator) instanceName() string {
	if c.cfg.ServerName != "" {
		return c.cfg.ServerName
	}
	host, _ := os.Hostname()
	dir, _ := filepath.Abs(c.cfg.DataDir)
	return host + ":" + dir
}

func checkFree(hp, flag string) error {
	if _, port, _ := splitHostPort(hp); port == 0 {
		return nil
	}
	ln, err := net.Listen("tcp", hp)
	if err != nil {
		return fmt.Errorf("%s %s: cannot listen: %w (pick another address or stop what uses it)", flag, hp, err)
	}
	return ln.Close()
}

func (c *Coordinator) startServer() error {
	oc, err := jwt.DecodeOperatorClaims(c.auth.OperatorJWT)
	if err != nil {
		return fmt.Errorf("operator JWT: %w", err)
	}
	resolver, err := server.NewDirAccResolver(c.auth.ResolverPath(), 0, 2*time.Minute, server.NoDelete)
	if err != nil {
		return fmt.Errorf("account resolver in %s: %w", c.auth.ResolverPath(), err)
	}
	host, port, _ := splitHostPort(c.cfg.Listen)
	if port == 0 {
		port = server.RANDOM_PORT // nats-server reads 0 as "the default 4222"
	}
	opts := &server.Options{
		ServerName:       c.cfg.ServerName,
		Host:             host,
		Port:             serverPort(port),
		JetStream:        true,
		JetStreamDomain:  c.cfg.Domain,
		StoreDir:         filepath.Join(c.cfg.DataDir, jetstreamDir),
		TrustedOperators: []*jwt.OperatorClaims{oc},
		SystemAccount:    c.auth.SystemAccount(),
		AccountResolver:  resolver,
		NoSigs:           true,
		MaxPayload:       int32(c.cfg.Limits.MaxPayload),
	}
	if c.cfg.LeafnodeListen != "" {
		lh, lp, _ := splitHostPort(c.cfg.LeafnodeListen)
		if lp == 0 {
			lp = server.RANDOM_PORT
		}
		opts.LeafNode.Host = lh
		opts.LeafNode.Port = serverPort(lp)
	}
	if c.cfg.Clustered() {
		ch, cp, _ := splitHostPort(c.cfg.ClusterListen)
		opts.Cluster.Name = c.cfg.ClusterName
		opts.Cluster.Host = ch
		opts.Cluster.Port = serverPort(cp)
		if len(c.cfg.Routes) > 0 {
			opts.Routes = server.RoutesFromStr(strings.Join(c.cfg.Routes, ","))
		}
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		return fmt.Errorf("configure NATS server: %w", err)
	}
	nlog := logging.NATS{L: c.log.With().Str("component", "nats").Logger(), OnFatal: func(msg string) { c.fatal.Store(&msg) }}
	ns.SetLoggerV2(nlog, c.log.GetLevel() <= zerolog.DebugLevel, c.log.GetLevel() <= zerolog.TraceLevel, false)
	c.ns = ns
	ns.Start()
	// Poll, so a server that failed (say, a port taken since checkFree)
	// is reported at once rather than after the whole wait.
	for deadline := time.Now().Add(15 * time.Second); ; {
		if msg := c.fatal.Load(); msg != nil {
			return fmt.Errorf("NATS server failed to start: %s", *msg)
		}
		if ns.ReadyForConnections(50 * time.Millisecond) {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("NATS server did not become ready within 15s (see the log above)")
		}
	}
}

// serverPort maps a configured port to nats-server's: there 0 means the
// default port (4222 for clients, no listener for leaf nodes) and -1 a free
// one, while fleet's flags use 0 for a free port as net.Listen does.
func serverPort(p int) int {
	if p == 0 {
		return server.RANDOM_PORT
	}
	return p
}

// connect opens the coordinator's own connections, in process.
func (c *Coordinator) connect() error {
	core, err := c.auth.CoreUser("fleet-coordinator-core")
	if err != nil {
		return err
	}
	c.nc, err = c.InProcessConn(core, "fleet-coordinator-core")
	if err != nil {
		return err
	}
	svc, err := c.auth.ServiceUser("fleet-coordinator")
	if err != nil {
		return err
	}
	c.fc, err = c.InProcessConn(svc, "fleet-coordinator")
	if err != nil {
		return err
	}
	sys, err := c.auth.SystemUser("fleet-coordinator-sys")
	if err != nil {
		return err
	}
	c.sys, err = c.InProcessConn(sys, "fleet-coordinator-sys")
	if err != nil {
		return err
	}

	c.js, err = jetstream.New(c.nc)
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	// The rollout engine and the device index each get a CORE connection
	// of their own: a connection is one lock and one reader in the client
	// and the server, and the index's flood of deliveries during a rollout
	// must not hold up the engine's writes of desired states.
	for _, o := range []struct {
		name string
		nc   **nats.Conn
		js   *jetstream.JetStream
	}{{"fleet-coordinator-engine", &c.engineNC, &c.engineJS}, {"fleet-coordinator-index", &c.indexNC, &c.indexJS}} {
		cr, err := c.auth.CoreUser(o.name)
		if err != nil {
			return err
		}
		if *o.nc, err = c.InProcessConn(cr, o.name); err != nil {
			return err
		}
		if *o.js, err = jetstream.New(*o.nc); err != nil {
			return fmt.Errorf("jetstream: %w", err)
		}
	}
	return nil
}

// InProcessConn connects to the embedded server without a socket.
func (c *Coordinator) InProcessConn(cr *accounts.Creds, name string) (*nats.Conn, error) {
	seed, err := cr.Key.Seed()
	if err != nil {
		return nil, err
	}
	nc, err := nats.Connect("", nats.InProcessServer(c.ns), nats.UserJWTAndSeed(cr.JWT, string(seed)),
		nats.Name(name), nats.MaxReconnects(-1),
		// Asynchronous errors (e.g. a watcher's consumer gone while the
		// coordinator shuts down) go to the log, not to stderr.
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			ev := c.log.Debug().Err(err).Str("conn", name)
			if sub != nil {
				ev = ev.Str("subject", sub.Subject)
			}
			ev.Msg("nats async error")
		}))
	if err != nil {
		return nil, fmt.Errorf("connect %s in process: %w", name, err)
	}
	return nc, nil
}

func (c *Coordinator) waitJetStream(ctx context.Context) error {
	// A cluster's first start waits for its peers and a meta leader.
	wait := 60 * time.Second
	if c.cfg.Clustered() {
		wait = 3 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	lastLog := time.Now()
	for {
		// Each attempt is short: in a cluster without a meta leader the
		// request goes unanswered until its deadline.
		actx, acancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := c.js.AccountInfo(actx)
		acancel()
		if err == nil {
			return nil
		} else if ctx.Err() != nil {
			return fmt.Errorf("JetStream did not become available: %w", err)
		} else if time.Since(lastLog) > 5*time.Second {
			lastLog = time.Now()
			c.log.Info().Err(err).Msg("waiting for JetStream (in a cluster: for the other coordinators)")
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// ensureStreams creates or updates every stream, bucket and object store. In a cluster
// every coordinator does so, concurrently, while the JetStream peers are
// still coming up (an R3 stream needs three of them): retry until it holds.
func (c *Coordinator) ensureStreams(ctx context.Context) error {
	if !c.cfg.Clustered() {
		return ensureStreams(ctx, c.js, c.cfg, c.stateDisk())
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	err := ensureClusterStreams(ctx, c.js, c.cfg, c.stateDisk(), 10*time.Second, func(err error) {
		c.log.Info().Err(err).Msg("waiting for the JetStream cluster")
	})
	if err != nil {
		return fmt.Errorf("JetStream cluster: %w (are --replicas coordinators up and routed to each other?)", err)
	}
	return nil
}

// retryInCluster runs a step of the start that only reads and sets up
// (safe to run again) and, in a cluster that has just formed, runs it again
// while it fails for a while: the streams all had a leader when created
// (ensureClusterStreams), but an election after that leaves a stream
// answering no request for a moment.
func (c *Coordinator) retryInCluster(ctx context.Context, step func() error) error {
	if !c.cfg.Clustered() {
		return step()
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return retry(ctx, step, func(err error) {
		c.log.Info().Err(err).Msg("waiting for the JetStream cluster")
	})
}

// every runs f every d until ctx ends; a tick that comes as ctx ends
// runs nothing.
func every(ctx context.Context, d time.Duration, f func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if ctx.Err() != nil {
			return
		}
		f()
	}
}

// stateDisk is the disk the fleet's state may use: --storage-gib, or less
// when this server's JetStream has less room (a small disk must not make
// the streams impossible to create).
func (c *Coordinator) stateDisk() int64 {
	disk := c.cfg.Limits.JetStreamDisk
	if jc := c.ns.JetStreamConfig(); jc != nil && jc.MaxStore > 0 && (disk <= 0 || jc.MaxStore < disk) {
		disk = jc.MaxStore
	}
	return disk
}

// PushAccount sends an account JWT to every server through the system
// account, the same way `nats-server` clusters and leaf nodes learn of
// updates; the local full resolver stores it and applies it at once.
func (c *Coordinator) PushAccount(ctx context.Context, tok string) error {
	claims, err := jwt.DecodeAccountClaims(tok)
	if err != nil {
		return fmt.Errorf("push account JWT: %w", err)
	}
	// The per-account subject reaches every resolver that holds the
	// account: the hub's, and the cache resolvers of sites' leaf nodes.
	msg, err := c.sys.RequestWithContext(ctx, subjects.AccountClaimsUpdate(claims.Subject), []byte(tok))
	if err != nil {
		return fmt.Errorf("push account JWT: %w", err)
	}
	var resp struct {
		Error *struct {
			Description string `json:"description"`
		} `json:"error"`
	}
	if err := json.Unmarshal(msg.Data, &resp); err == nil && resp.Error != nil {
		return fmt.Errorf("push account JWT: %s", resp.Error.Description)
	}
	return nil
}

// Close stops the coordinator and its server.
func (c *Coordinator) Close() {
	c.closeOne.Do(func() {
		c.ready.Store(false)
		if c.stop != nil {
			c.stop()
		}
		if c.stopWatch != nil {
			c.stopWatch()
		}
		if c.engineDone != nil {
			select {
			case <-c.engineDone:
			case <-time.After(5 * time.Second):
				c.log.Warn().Msg("rollout engine did not stop within 5s")
			}
		}
		c.svc.stop()
		if c.httpSrv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = c.httpSrv.Shutdown(ctx)
			cancel()
		} else if c.httpLn != nil {
			c.httpLn.Close()
		}
		if c.fc != nil {
			_ = c.fc.Drain()
		}
		if c.nc != nil {
			_ = c.nc.Drain()
		}
		for _, nc := range []*nats.Conn{c.engineNC, c.indexNC} {
			if nc != nil {
				nc.Close()
			}
		}
		if c.sys != nil {
			c.sys.Close()
		}
		if c.ns != nil {
			c.ns.Shutdown()
			c.ns.WaitForShutdown()
		}
		c.lock.Release()
		close(c.done)
	})
}

// Done is closed when the coordinator has stopped.
func (c *Coordinator) Done() <-chan struct{} { return c.done }

// ClientURL is the URL clients on this host use.
func (c *Coordinator) ClientURL() string { return c.ns.ClientURL() }

// ClientAddr is the address the server listens on for clients (the real
// port when --listen asked for port 0).
func (c *Coordinator) ClientAddr() string {
	if a := c.ns.Addr(); a != nil {
		return a.String()
	}
	return c.cfg.Listen
}

// ClusterURL is the route URL the other coordinators of a cluster use
// ("" when not clustered; the real port when --cluster-listen said 0).
func (c *Coordinator) ClusterURL() string {
	if !c.cfg.Clustered() || c.ns == nil {
		return ""
	}
	a := c.ns.ClusterAddr()
	if a == nil {
		return ""
	}
	host := a.IP.String()
	if a.IP.IsUnspecified() {
		host = "127.0.0.1"
	}
	return "nats-route://" + net.JoinHostPort(host, fmt.Sprint(a.Port))
}

// LeafURL is the URL leaf nodes connect to ("" when disabled).
func (c *Coordinator) LeafURL() string {
	if c.cfg.LeafnodeListen == "" {
		return ""
	}
	host, port, _ := splitHostPort(c.cfg.LeafnodeListen)
	if host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	if port == 0 && c.ns != nil {
		// The port the server picked.
		if v, err := c.ns.Varz(nil); err == nil {
			port = v.LeafNode.Port
		}
	}
	return fmt.Sprintf("nats-leaf://%s", net.JoinHostPort(host, fmt.Sprint(port)))
}

// HTTPAddr is the address of the HTTP endpoint ("" when disabled).
func (c *Coordinator) HTTPAddr() string {
	if c.httpLn == nil {
		return ""
	}
	return c.httpLn.Addr().String()
}

// Authority is the fleet's identity authority.
func (c *Coordinator) Authority() *accounts.Authority { return c.auth }

// Server is the embedded NATS server.
func (c *Coordinator) Server() *server.Server { return c.ns }

// Conn is the coordinator's own CORE connection (the fleet's state).
func (c *Coordinator) Conn() *nats.Conn { return c.nc }

// ClientConn is the coordinator's own FLEET connection (the clients' side).
func (c *Coordinator) ClientConn() *nats.Conn { return c.fc }

// JetStream is the coordinator's JetStream handle.
func (c *Coordinator) JetStream() jetstream.JetStream { return c.js }

// Config is the configuration the coordinator runs with.
func (c *Coordinator) Config() Config { return c.cfg }

// Ready reports whether the coordinator serves: JetStream current and every
// stream and bucket in place.
func (c *Coordinator) Ready() error {
	if !c.ready.Load() {
		return errors.New("starting")
	}
	if c.index == nil || !c.index.CaughtUp() {
		// Ready means the index holds every device: a status read now is
		// the fleet's, not part of it.
		return errors.New("indexing the devices' records, facts and events")
	}
	if st := c.ns.Healthz(nil); st.Status != "ok" {
		return fmt.Errorf("jetstream: %s", st.Error)
	}
	return nil
}

// Metrics is what /metrics serves, as a Gatherer.
func (c *Coordinator) Metrics() prometheus.Gatherer { return c.metrics }
