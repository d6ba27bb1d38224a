package broker

import (
	"slices"
	"strings"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"

	"fleet/model"
)

// The coordinator's /metrics: the device index's families, written as text
// from a snapshot at scrape time (fleetCollector), and a registry of its
// own (never the global one) holding a collector that reads the embedded
// server's Varz and Jsz, the services' and MDM's collectors, and Go
// runtime and process collectors. Per-device series exist for devices with a record that is not
// revoked, so a fleet of N devices exports O(N) series and deleting or
// revoking a record removes its series at the next scrape.

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

// The index's families, written as text (exposition.go).
var (
	famDevices         = family{"fleet_devices", "Device records by status.", dto.MetricType_GAUGE}
	famDevicesOnline   = family{"fleet_devices_online", "Devices online (not revoked): connected per the server's advisories, or last seen within 3 facts intervals when the coordinator has no advisory source.", dto.MetricType_GAUGE}
	famLastSeen        = family{"fleet_device_last_seen_timestamp_seconds", "When the coordinator stored the device's latest facts or event message (Unix seconds).", dto.MetricType_GAUGE}
	famGeneration      = family{"fleet_device_generation_info", "The system the device runs (current_system of its latest facts).", dto.MetricType_GAUGE}
	famDesired         = family{"fleet_device_desired_info", "The system the device should run (its fleet_desired store path).", dto.MetricType_GAUGE}
	famUpToDate        = family{"fleet_device_up_to_date", "1 when the device runs its desired system (or has none), 0 otherwise or before its first facts.", dto.MetricType_GAUGE}
	famDiskUsed        = family{"fleet_device_disk_used_ratio", "Used fraction of each mount the device reported.", dto.MetricType_GAUGE}
	famRebootNeeded    = family{"fleet_device_reboot_needed", "1 when the booted kernel, initrd or modules differ from the current system's.", dto.MetricType_GAUGE}
	famApplySuccess    = family{"fleet_device_last_apply_success", "1 when the device's latest apply succeeded (or changed nothing), 0 when it failed or was rolled back; absent before any apply.", dto.MetricType_GAUGE}
	famOnline          = family{"fleet_device_online", "1 when the device is online (see fleet_devices_online).", dto.MetricType_GAUGE}
	famAgentStates     = family{"fleet_devices_agent_state", "Devices by their agent's latest reconcile state (idle, checking, fetching, applying, verifying, reporting, rolling_back), from their events; an apply's result counts as idle.", dto.MetricType_GAUGE}
	famRolloutDevices  = family{"fleet_rollout_devices", "Devices of a rollout by their state in it (unfinished rollouts and those finished within 24h).", dto.MetricType_GAUGE}
	famRolloutInfo     = family{"fleet_rollout_info", "A rollout, its release and its state (unfinished rollouts and those finished within 24h).", dto.MetricType_GAUGE}
	famIndexMessages   = family{"fleet_index_messages_total", "Messages and KV entries the device index has taken in, by source.", dto.MetricType_COUNTER}
	famIndexDecodeErrs = family{"fleet_index_decode_errors_total", "Messages and KV entries the device index could not decode.", dto.MetricType_COUNTER}
	famEncryption      = family{"fleet_devices_encryption", "Devices by root file system encryption: encrypted, unencrypted, unknown (no facts yet).", dto.MetricType_GAUGE}
	famEncrypted       = family{"fleet_device_root_encrypted", "1 when the device's root file system is on an encrypted (LUKS) device, 0 when not (absent: unknown).", dto.MetricType_GAUGE}
)

var (
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

// fleetCollector writes the device index's families.
type fleetCollector struct{ x *deviceIndex }

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

// deviceSeries is what one exported device's series need.
type deviceSeries struct {
	row       model.DeviceStatusRow
	facts     bool
	mounts    []model.Mount // valid labels, no repeats, at most maxMountSeries
	encrypted *bool
}

func (fc fleetCollector) writeText(e *exposition) {
	sn := fc.x.snapshot()
	byStatus := map[model.DeviceStatus]int{model.DevicePending: 0, model.DeviceActive: 0, model.DeviceRevoked: 0}
	byState := map[model.State]int{}
	for _, st := range model.States {
		byState[st] = 0
	}
	encryption := map[string]int{"encrypted": 0, "unencrypted": 0, "unknown": 0}
	online := 0
	devs := make([]deviceSeries, 0, len(sn.devs))
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
		d := deviceSeries{row: sn.row(s), facts: s.facts != nil}
		if d.row.Online {
			online++
		}
		if f := s.facts; f != nil {
			// A device decides how many mounts it reports: the series it
			// may cost are capped, and labels are plain paths of sane size.
			for _, m := range f.Mounts {
				if len(d.mounts) == maxMountSeries {
					break
				}
				if validMountLabel(m.Path) && !slices.ContainsFunc(d.mounts, func(o model.Mount) bool { return o.Path == m.Path }) {
					d.mounts = append(d.mounts, m)
				}
			}
			d.encrypted = f.Encryption.RootEncrypted
		}
		switch {
		case d.encrypted == nil:
			encryption["unknown"]++
		case *d.encrypted:
			encryption["encrypted"]++
		default:
			encryption["unencrypted"]++
		}
		devs = append(devs, d)
	}

	// Each per-device family: its header, then a line per device that has it.
	each := func(f family, line func(d *deviceSeries, id, name string)) {
		e.family(f)
		for i := range devs {
			line(&devs[i], devs[i].row.ID, devs[i].row.Name)
		}
	}
	each(famOnline, func(d *deviceSeries, id, name string) {
		e.sample(famOnline.name, b2f(d.row.Online), "device", id, "name", name)
	})
	each(famLastSeen, func(d *deviceSeries, id, name string) {
		if !d.row.LastSeen.IsZero() {
			e.sample(famLastSeen.name, float64(d.row.LastSeen.UnixMilli())/1e3, "device", id, "name", name)
		}
	})
	each(famGeneration, func(d *deviceSeries, id, name string) {
		if p := d.row.CurrentSystem; p != "" && model.CheckStorePath(p) == nil {
			e.sample(famGeneration.name, 1, "device", id, "name", name, "store_path", p)
		}
	})
	each(famDesired, func(d *deviceSeries, id, name string) {
		if p := d.row.DesiredSystem; p != "" {
			e.sample(famDesired.name, 1, "device", id, "name", name, "store_path", p)
		}
	})
	each(famUpToDate, func(d *deviceSeries, id, name string) {
		e.sample(famUpToDate.name, b2f(d.row.UpToDate), "device", id, "name", name)
	})
	each(famRebootNeeded, func(d *deviceSeries, id, name string) {
		if d.facts {
			e.sample(famRebootNeeded.name, b2f(d.row.RebootNeeded), "device", id, "name", name)
		}
	})
	each(famDiskUsed, func(d *deviceSeries, id, name string) {
		for _, m := range d.mounts {
			e.sample(famDiskUsed.name, m.UsedRatio(), "device", id, "name", name, "mount", m.Path)
		}
	})
	each(famApplySuccess, func(d *deviceSeries, id, name string) {
		if r := d.row.LastResult; r != "" {
			e.sample(famApplySuccess.name, b2f(r == model.ResultSucceeded || r == model.ResultUnchanged), "device", id, "name", name)
		}
	})
	each(famEncrypted, func(d *deviceSeries, id, name string) {
		if d.encrypted != nil {
			e.sample(famEncrypted.name, b2f(*d.encrypted), "device", id, "name", name)
		}
	})

	e.family(famDevices)
	for _, st := range []model.DeviceStatus{model.DevicePending, model.DeviceActive, model.DeviceRevoked} {
		e.sample(famDevices.name, float64(byStatus[st]), "status", string(st))
	}
	e.family(famDevicesOnline)
	e.sample(famDevicesOnline.name, float64(online))
	e.family(famAgentStates)
	for _, st := range model.States {
		e.sample(famAgentStates.name, float64(byState[st]), "state", string(st))
	}
	e.family(famEncryption)
	for _, st := range []string{"encrypted", "unencrypted", "unknown"} {
		e.sample(famEncryption.name, float64(encryption[st]), "state", st)
	}
	shown := sn.shownRollouts()
	e.family(famRolloutInfo)
	for _, r := range shown {
		e.sample(famRolloutInfo.name, 1, "rollout", r.ID, "release", r.ReleaseID, "state", string(r.State))
	}
	e.family(famRolloutDevices)
	for _, r := range shown {
		for _, st := range model.DeviceRolloutStates {
			e.sample(famRolloutDevices.name, float64(r.Counts[st]), "rollout", r.ID, "state", string(st))
		}
	}
	st := &fc.x.stats
	e.family(famIndexMessages)
	for _, src := range []struct {
		name string
		n    uint64
	}{
		{"devices", st.records.Load()}, {"desired", st.desired.Load()}, {"events", st.events.Load()},
		{"facts", st.facts.Load()}, {"rollouts", st.rollouts.Load()},
	} {
		e.sample(famIndexMessages.name, float64(src.n), "source", src.name)
	}
	e.family(famIndexDecodeErrs)
	e.sample(famIndexDecodeErrs.name, float64(st.decodeErrors.Load()))
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

// newMetricsRegistry builds the coordinator's registry: everything but
// the index's families, which fleetCollector writes as text.
func newMetricsRegistry(ns *server.Server, coreAccount string) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		&natsCollector{ns: ns, account: coreAccount, errors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fleet_nats_scrape_errors_total", Help: "Failures to read the embedded server's statistics.",
		})},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return reg
}
