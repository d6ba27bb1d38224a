package integration

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"fleet/accounts"
	"fleet/internal/poll"
	"fleet/model"
)

// clusterNode is one fleet-coordinator process of a three-node cluster.
type clusterNode struct {
	name, dir, listen, cluster, http string
	log                              string
	cmd                              *exec.Cmd
	done                             chan struct{}
}

func (n *clusterNode) url() string { return "nats://" + n.listen }

// startClusterNodes runs three fleet-coordinator processes routed to each
// other, sharing one identity (init, then init --from), and waits until
// each is ready. A port taken between its choice and the node's listen
// (another test's process got it first) starts the three again on new
// ports.
func startClusterNodes(t *testing.T, ctx context.Context) []*clusterNode {
	t.Helper()
	for attempt := 1; ; attempt++ {
		nodes, busy := tryClusterNodes(t, ctx)
		if busy == nil {
			return nodes
		}
		if attempt == 3 {
			t.Fatalf("three starts, each with a port taken: %v", busy)
		}
		t.Logf("starting the cluster again on new ports: %v", busy)
	}
}

// tryClusterNodes is one start of startClusterNodes; busy is not nil (and
// the nodes stopped) when a node could not listen on a port it was given.
func tryClusterNodes(t *testing.T, ctx context.Context) (nodes []*clusterNode, busy error) {
	t.Helper()
	nodes = make([]*clusterNode, 3)
	base := t.TempDir()
	for i := range nodes {
		dir := filepath.Join(base, fmt.Sprintf("n%d", i+1))
		nodes[i] = &clusterNode{name: fmt.Sprintf("n%d", i+1), dir: dir, listen: freeAddr(t), cluster: freeAddr(t), http: freeAddr(t),
			log: dir + ".log"}
	}
	if out, err := exec.CommandContext(ctx, coordinatorBin, "init", "--data-dir", nodes[0].dir).CombinedOutput(); err != nil {
		t.Fatalf("init: %v\n%s", err, out)
	}
	for _, n := range nodes[1:] {
		if out, err := exec.CommandContext(ctx, coordinatorBin, "init", "--from", nodes[0].dir, "--data-dir", n.dir).CombinedOutput(); err != nil {
			t.Fatalf("init --from: %v\n%s", err, out)
		}
	}
	for _, n := range nodes {
		var routes []string
		for _, o := range nodes {
			if o != n {
				routes = append(routes, "nats-route://"+o.cluster)
			}
		}
		logf, err := os.Create(n.log)
		if err != nil {
			t.Fatal(err)
		}
		n.cmd = exec.Command(coordinatorBin, "--log-format", "json", "run", "--data-dir", n.dir, "--listen", n.listen, "--http", n.http,
			"--server-name", n.name, "--cluster-listen", n.cluster, "--routes", strings.Join(routes, ","))
		n.cmd.Stdout, n.cmd.Stderr = logf, logf
		if err := n.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		n.done = make(chan struct{})
		go func() { _ = n.cmd.Wait(); logf.Close(); close(n.done) }()
		t.Cleanup(func() {
			_ = n.cmd.Process.Signal(syscall.SIGTERM)
			<-n.done
			if t.Failed() {
				b, _ := os.ReadFile(n.log)
				t.Logf("%s log (tail):\n%s", n.name, tail(string(b), 3000))
			}
		})
	}
	stopAll := func() {
		for _, n := range nodes {
			_ = n.cmd.Process.Signal(syscall.SIGTERM)
			<-n.done
		}
	}
	for _, n := range nodes {
		poll.Telling(t, 3*time.Minute, n.name+" ready", func() (bool, string) {
			for _, o := range nodes {
				select {
				case <-o.done:
					b, _ := os.ReadFile(o.log)
					if strings.Contains(string(b), "address already in use") {
						busy = fmt.Errorf("%s: %s", o.name, strings.TrimSpace(tail(string(b), 300)))
						return true, ""
					}
					t.Fatalf("%s exited:\n%s", o.name, tail(string(b), 3000))
				default:
				}
			}
			resp, err := http.Get("http://" + n.http + "/readyz")
			if err != nil {
				return false, err.Error()
			}
			resp.Body.Close()
			return resp.StatusCode == http.StatusOK, resp.Status
		})
		if busy != nil {
			stopAll()
			return nil, busy
		}
	}
	return nodes, nil
}

// engineLeader is the node whose log says it leads the rollout engine
// last.
func engineLeader(nodes []*clusterNode) *clusterNode {
	for _, n := range nodes {
		b, _ := os.ReadFile(n.log)
		s := string(b)
		if i := strings.LastIndex(s, "rollout engine: leading"); i >= 0 && !strings.Contains(s[i:], "rollout engine: stopped leading") {
			return n
		}
	}
	return nil
}

// Three coordinator processes, agents spread over them: kill -9 of the
// engine leader mid-rollout; another node takes over, the rollout
// finishes, each device switched once, the audit still verifies.
// Revocations at the same moment on two nodes are both refused on every
// node (within 0.1–0.2 s; the deadline leaves room for a loaded machine).
func TestClusterProcessesSurviveLeaderKill(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	nodes := startClusterNodes(t, ctx)
	urls := make([]string, len(nodes))
	for i, n := range nodes {
		urls[i] = n.url()
	}
	// The owner talks to node 2; devices know every node (and spread over
	// them: the client picks at random).
	w := &fleetWorld{t: t, ctx: ctx, dataDir: nodes[0].dir, listen: nodes[1].listen, creds: filepath.Join(nodes[0].dir, accounts.AdminCredsFile)}
	cr, err := accounts.ReadCreds(w.creds)
	if err != nil {
		t.Fatal(err)
	}
	w.signer = cr.PublicKey()
	gen1, gen2 := fakePath("gen1"), fakePath("gen2")
	token := strings.TrimSpace(w.mustAdmin("token", "create", "--group", "hq", "--uses", "6", "--ttl", "1h"))
	var creds []*accounts.Creds
	for i := range 6 {
		d, c := w.startDevice(fmt.Sprintf("dev%02d", i), token, strings.Join(urls, ","), gen1)
		w.devices = append(w.devices, d)
		creds = append(creds, c)
	}
	w.release("rel-2", gen2)
	canary := w.devices[0]
	gate, switching := canary.act.holdSwitch()
	id := strings.TrimSpace(w.mustAdmin("deploy", "--release", "rel-2", "--group", "hq", "--strategy", "canary", "--health-timeout", "3m"))
	select {
	case <-switching:
	case <-ctx.Done():
		t.Fatal("the canary never started switching")
	}
	auditBefore := w.mustAdmin("audit", "verify")

	leader := engineLeader(nodes)
	if leader == nil {
		t.Fatal("no node leads the rollout engine")
	}
	if err := leader.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-leader.done
	var alive []*clusterNode
	for _, n := range nodes {
		if n != leader {
			alive = append(alive, n)
		}
	}
	close(gate) // the canary finishes its apply while the leader is gone
	w.listen = alive[0].listen
	// While the streams the killed node led elect new leaders, a request
	// may fail ("no response from stream"); an admin would try again.
	var out string
	poll.Telling(t, time.Minute, "rollout watch through a surviving node", func() (bool, string) {
		o, errs, err := w.admin("--json", "rollout", "watch", id)
		out = o
		return err == nil, fmt.Sprintf("%v %s", err, errs)
	})
	if last := lastRollout(t, out); last.State != model.RolloutSucceeded || last.Counts[model.DeviceSucceeded] != 6 {
		t.Fatalf("after killing %s: %+v", leader.name, last.Rollout)
	}
	for _, d := range w.devices {
		if n := d.act.switchCount(gen2); n != 1 {
			t.Fatalf("%s switched to gen2 %d times", d.name, n)
		}
	}
	if out := w.mustAdmin("audit", "verify"); !strings.Contains(out, "0 accepted entries with a bad signature") {
		t.Fatalf("audit verify after the kill: %s (before: %s)", out, auditBefore)
	}

	// Revocations at the same moment through two nodes.
	var wg sync.WaitGroup
	for i, name := range []string{"dev04", "dev05"} {
		node := alive[i]
		wg.Go(func() {
			cmd := exec.CommandContext(ctx, adminBin, "--server", node.url(), "--creds", w.creds, "devices", "revoke", "--yes", name)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("revoke %s through %s: %v %s", name, node.name, err, out)
			}
		})
	}
	wg.Wait()
	refused := func(n *clusterNode, c *accounts.Creds) bool {
		seed, _ := c.Key.Seed()
		nc, err := nats.Connect(n.url(), nats.UserJWTAndSeed(c.JWT, string(seed)), nats.NoReconnect(), nats.Timeout(time.Second))
		if err == nil {
			nc.Close()
			return false
		}
		return strings.Contains(strings.ToLower(err.Error()), "authorization")
	}
	poll.Until(t, 10*time.Second, "both revoked devices refused on every live node", func() bool {
		for _, n := range alive {
			if !refused(n, creds[4]) || !refused(n, creds[5]) {
				return false
			}
		}
		return true
	})
	for _, n := range alive {
		if refused(n, creds[3]) {
			t.Fatalf("a device nobody revoked is refused on %s", n.name)
		}
	}
}
