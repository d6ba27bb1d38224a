package broker

import (
	"net/http"
	"strings"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"fleet/model"
)

// The coordinator's /metrics: a registry of its own (never the global one),
// holding a collector that reads the device index at scrape time, one that
// reads the embedded server's Varz and Jsz, and Go runtime and process
// collectors. Per-device series exist for devices with a record that is not
// revoked, so a fleet of N devices exports O(N) series and deleting or
// revoking a record removes its series at the next scrape.

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

var (
	descDevices         = desc("fleet_devices", "Device records by status.", "status")
	descDevicesOnline   = desc("fleet_devices_online", "Devices online (not revoked): connected per the server's advisories, or last seen within 3 facts intervals when the coordinator has no advisory source.")
	descLastSeen        = desc("fleet_device_last_seen_timestamp_seconds", "When the coordinator stored the device's latest facts or event message (Unix seconds).", "device", "name")
	descGeneration      = desc("fleet_device_generation_info", "The system the device runs (current_system of its latest facts).", "device", "name", "store_path")
	descDesired         = desc("fleet_device_desired_info", "The system the device should run (its fleet_desired store path).", "device", "name", "store_path")
	descUpToDate        = desc("fleet_device_up_to_date", "1 when the device runs its desired system (or has none), 0 otherwise or before its first facts.", "device", "name")
	descDiskUsed        = desc("fleet_device_disk_used_ratio", "Used fraction of each mount the device reported.", "device", "name", "mount")
	descRebootNeeded    = desc("fleet_device_reboot_needed", "1 when the booted kernel, initrd or modules differ from the current system's.", "device", "name")
	descApplySuccess    = desc("fleet_device_last_apply_success", "1 when the device's latest apply succeeded (or changed nothing), 0 when it failed or was rolled back; absent before any apply.", "device", "name")
	descOnline          = desc("fleet_device_online", "1 when the device is online (see fleet_devices_online).", "device", "name")
	descAgentStates     = desc("fleet_devices_agent_state", "Devices by their agent's latest reconcile state (idle, checking, fetching, applying, verifying, reporting, rolling_back), from their events; an apply's result counts as idle.", "state")
	descRolloutDevices  = desc("fleet_rollout_devices", "Devices of a rollout by their state in it (unfinished rollouts and those finished within 24h).", "rollout", "state")
	descRolloutInfo     = desc("fleet_rollout_info", "A rollout, its release and its state (unfinished rollouts and those finished within 24h).", "rollout", "release", "state")
	descIndexMessages   = desc("fleet_index_messages_total", "Messages and KV entries the device index has taken in, by source.", "source")
	descIndexDecodeErrs = desc("fleet_index_decode_errors_total", "Messages and KV entries the device index could not decode.")

	descNATSConnections = desc("fleet_nats_connections", "Client connections to the embedded NATS server.")
	descNATSTotalConns  = desc("fleet_nats_connections_total", "Client connections the embedded NATS server has accepted since start.")
	descNATSLeafnodes   = desc("fleet_nats_leafnodes", "Leaf node connections.")
	descNATSSubs        = desc("fleet_nats_subscriptions", "Active subscriptions.")
	descNATSSlow        = desc("fleet_nats_slow_consumers_total", "Clients disconnected for being slow consumers.")
	descNATSInMsgs      = desc("fleet_nats_in_msgs_total", "Messages received by the server.")
	descNATSOutMsgs     = desc("fleet_nats_out_msgs_total", "Messages sent by the server.")
	descNATSInBytes     = desc("fleet_nats_in_bytes_total", "Bytes received by the server.")
	descNATSOutBytes    = desc("fleet_nats_out_bytes_total", "Bytes sent by the server.")
	descJSStorage       = desc("fleet_jetstream_storage_bytes", "JetStream file storage in use.")
	descJSStreamBytes   = desc("fleet_jetstream_stream_bytes", "Bytes each stream of the fleet's state holds; alert well before fleet_jetstream_stream_max_bytes.", "stream")
	descJSStreamMax     = desc("fleet_jetstream_stream_max_bytes", "Bytes each stream may hold before it drops its oldest messages.", "stream")
	descJSMemory        = desc("fleet_jetstream_memory_bytes", "JetStream memory storage in use.")
	descJSStreams       = desc("fleet_jetstream_streams", "JetStream streams (KV buckets included).")
	descJSConsumers     = desc("fleet_jetstream_consumers", "JetStream consumers.")
	descJSMessages      = desc("fleet_jetstream_messages", "Messages stored in JetStream.")
	descJSAPIRequests   = desc("fleet_jetstream_api_requests_total", "JetStream API requests.")
	descJSAPIErrors     = desc("fleet_jetstream_api_errors_total", "JetStream API requests that failed.")
)

// fleetCollector exports the device index.
type fleetCollector struct{ x *deviceIndex }

func (fc fleetCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descDevices, descDevicesOnline, descLastSeen, descGeneration, descDesired,
		descUpToDate, descDiskUsed, descRebootNeeded, descApplySuccess, descOnline, descAgentStates, descRolloutDevices, descRolloutInfo,
		descIndexMessages, descIndexDecodeErrs} {
		ch <- d
	}
}

// maxMountSeries caps fleet_device_disk_used_ratio series per device.
const maxMountSeries = 32

// validMountLabel: an absolute path of at most 256 bytes of printable
// UTF-8.
func validMountLabel(p string) bool {
	return len(p) > 0 && len(p) <= 256 && p[0] == '/' && model.CleanText(p) == p && !strings.ContainsAny(p, "\n\t")
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (fc fleetCollector) Collect(ch chan<- prometheus.Metric) {
	sn := fc.x.snapshot()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	byStatus := map[model.DeviceStatus]int{model.DevicePending: 0, model.DeviceActive: 0, model.DeviceRevoked: 0}
	online := 0
	byState := map[model.State]int{}
	for _, st := range model.States {
		byState[st] = 0
	}
	for _, s := range sn.devs {
		if s.rec == nil {
			continue
		}
		byStatus[s.rec.Status]++
		if !s.exported() {
			continue
		}
		if s.event != nil {
			st := s.event.State
			if s.event.Result.Final() {
				st = model.StateIdle // a result ends the apply
			}
			if _, known := byState[st]; known {
				byState[st]++
			}
		}
		r := sn.row(s)
		id, name := r.ID, r.Name
		if r.Online {
			online++
		}
		gauge(descOnline, b2f(r.Online), id, name)
		if !r.LastSeen.IsZero() {
			gauge(descLastSeen, float64(r.LastSeen.UnixMilli())/1e3, id, name)
		}
		if r.CurrentSystem != "" && model.CheckStorePath(r.CurrentSystem) == nil {
			gauge(descGeneration, 1, id, name, r.CurrentSystem)
		}
		if r.DesiredSystem != "" {
			gauge(descDesired, 1, id, name, r.DesiredSystem)
		}
		gauge(descUpToDate, b2f(r.UpToDate), id, name)
		if s.facts != nil {
			gauge(descRebootNeeded, b2f(r.RebootNeeded), id, name)
			// A device decides how many mounts it reports: the series it
			// may cost are capped, and labels are plain paths of sane size.
			seen := map[string]bool{}
			for _, m := range s.facts.Mounts {
				if len(seen) == maxMountSeries {
					break
				}
				if !validMountLabel(m.Path) || seen[m.Path] {
					continue
				}
				seen[m.Path] = true
				gauge(descDiskUsed, m.UsedRatio(), id, name, m.Path)
			}
		}
		if r.LastResult != "" {
			gauge(descApplySuccess, b2f(r.LastResult == model.ResultSucceeded || r.LastResult == model.ResultUnchanged), id, name)
		}
	}
	for st, n := range byStatus {
		gauge(descDevices, float64(n), string(st))
	}
	gauge(descDevicesOnline, float64(online))
	for st, n := range byState {
		gauge(descAgentStates, float64(n), string(st))
	}
	for _, r := range sn.shownRollouts() {
		gauge(descRolloutInfo, 1, r.ID, r.ReleaseID, string(r.State))
		for _, st := range model.DeviceRolloutStates {
			gauge(descRolloutDevices, float64(r.Counts[st]), r.ID, string(st))
		}
	}
	st := &fc.x.stats
	for src, v := range map[string]uint64{
		"facts": st.facts.Load(), "events": st.events.Load(), "devices": st.records.Load(),
		"desired": st.desired.Load(), "rollouts": st.rollouts.Load(),
	} {
		ch <- prometheus.MustNewConstMetric(descIndexMessages, prometheus.CounterValue, float64(v), src)
	}
	ch <- prometheus.MustNewConstMetric(descIndexDecodeErrs, prometheus.CounterValue, float64(st.decodeErrors.Load()))
}

// natsCollector exports the embedded server's own figures.
type natsCollector struct {
	ns *server.Server
	// account is the account whose streams are reported (CORE).
	account string
	errors  prometheus.Counter
}

func (nc *natsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descNATSConnections, descNATSTotalConns, descNATSLeafnodes, descNATSSubs,
		descNATSSlow, descNATSInMsgs, descNATSOutMsgs, descNATSInBytes, descNATSOutBytes, descJSStorage, descJSMemory,
		descJSStreams, descJSConsumers, descJSMessages, descJSAPIRequests, descJSAPIErrors, descJSStreamBytes, descJSStreamMax} {
		ch <- d
	}
	nc.errors.Describe(ch)
}

func (nc *natsCollector) Collect(ch chan<- prometheus.Metric) {
	defer nc.errors.Collect(ch)
	g := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v)
	}
	c := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v)
	}
	if v, err := nc.ns.Varz(nil); err != nil {
		nc.errors.Inc()
	} else {
		g(descNATSConnections, float64(v.Connections))
		c(descNATSTotalConns, float64(v.TotalConnections))
		g(descNATSLeafnodes, float64(v.Leafs))
		g(descNATSSubs, float64(v.Subscriptions))
		c(descNATSSlow, float64(v.SlowConsumers))
		c(descNATSInMsgs, float64(v.InMsgs))
		c(descNATSOutMsgs, float64(v.OutMsgs))
		c(descNATSInBytes, float64(v.InBytes))
		c(descNATSOutBytes, float64(v.OutBytes))
	}
	if j, err := nc.ns.Jsz(&server.JSzOptions{}); err != nil {
		nc.errors.Inc()
	} else {
		g(descJSStorage, float64(j.Store))
		g(descJSMemory, float64(j.Memory))
		g(descJSStreams, float64(j.Streams))
		g(descJSConsumers, float64(j.Consumers))
		g(descJSMessages, float64(j.Messages))
		c(descJSAPIRequests, float64(j.API.Total))
		c(descJSAPIErrors, float64(j.API.Errors))
	}
	if nc.account == "" {
		return
	}
	if j, err := nc.ns.Jsz(&server.JSzOptions{Account: nc.account, Streams: true, Config: true}); err != nil {
		nc.errors.Inc()
	} else {
		for _, a := range j.AccountDetails {
			for _, st := range a.Streams {
				ch <- prometheus.MustNewConstMetric(descJSStreamBytes, prometheus.GaugeValue, float64(st.State.Bytes), st.Name)
				if st.Config != nil && st.Config.MaxBytes > 0 {
					ch <- prometheus.MustNewConstMetric(descJSStreamMax, prometheus.GaugeValue, float64(st.Config.MaxBytes), st.Name)
				}
			}
		}
	}
}

// newMetricsRegistry builds the coordinator's registry.
func newMetricsRegistry(x *deviceIndex, ns *server.Server, coreAccount string) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		fleetCollector{x: x},
		&natsCollector{ns: ns, account: coreAccount, errors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleet_nats_scrape_errors_total", Help: "Failures to read the embedded server's statistics.",
		})},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return reg
}

// metricsHandler serves reg in the Prometheus exposition formats.
func metricsHandler(reg *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		Registry:            reg, // promhttp_metric_handler_errors_total
		MaxRequestsInFlight: 4,
		ErrorHandling:       promhttp.ContinueOnError,
	})
}
