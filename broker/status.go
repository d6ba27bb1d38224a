package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"fleet/model"
	"fleet/subjects"
)

// Status is the fleet's state for `fleet-admin status`: one row per device
// with a record that is not revoked, in group ("" = all), and their summary.
// It reads the device index, so it costs no JetStream request.
func (c *Coordinator) Status(group string) model.StatusReport {
	sn := c.index.snapshot()
	rows := sn.rows(group)
	return model.StatusReport{Group: group, Time: sn.at, Summary: model.Summarize(rows), Devices: rows}
}

// Rollouts lists the rollouts the index holds that are unfinished or
// finished within the last 24 hours.
func (c *Coordinator) Rollouts() []model.RolloutStatusRow {
	out := []model.RolloutStatusRow{}
	for _, r := range c.index.snapshot().shownRollouts() {
		out = append(out, model.RolloutRow(r))
	}
	return out
}

// SetOnlineSource makes src decide which devices are online (the server's
// connect/disconnect advisories). Until it is called, a device counts as
// online when it was last seen within three facts intervals.
func (c *Coordinator) SetOnlineSource(src interface{ Online(id string) bool }) {
	c.index.setOnline(src)
}

// ErrUnknownDevice is returned for a device ID without a record.
var ErrUnknownDevice = errors.New("unknown device")

// FactsHistory returns device id's fact reports stored since now-since,
// oldest first: every one the stream keeps (its per-device history), read
// a page at a time.
func (c *Coordinator) FactsHistory(ctx context.Context, id string, since time.Duration) ([]model.Facts, error) {
	var out []model.Facts
	var after uint64
	for {
		page, last, more, err := c.FactsPage(ctx, id, since, after, 1000)
		if err != nil {
			return nil, err
		}
		out = append(out, page...)
		if !more {
			if out == nil {
				out = []model.Facts{}
			}
			return out, nil
		}
		after = last
	}
}

// FactsPage returns up to limit of device id's fact reports stored since
// now-since (or, when after is not 0, stored after stream sequence after),
// oldest first, and about maxPageBytes at most. more tells whether later
// reports were stored when the page was read; last is the stream sequence
// of the page's last report, the start of the next page. It reads
// FLEET_FACTS with one short-lived ordered consumer filtered to the
// device's subject.
func (c *Coordinator) FactsPage(ctx context.Context, id string, since time.Duration, after uint64, limit int) (facts []model.Facts, last uint64, more bool, err error) {
	if err := subjects.CheckDeviceID(id); err != nil {
		return nil, 0, false, err
	}
	if since <= 0 {
		return nil, 0, false, fmt.Errorf("since %s: must be a positive duration, e.g. 24h", since)
	}
	if limit <= 0 {
		limit = capFacts
	}
	devKV, err := c.js.KeyValue(ctx, subjects.BucketDevices)
	if err != nil {
		return nil, 0, false, fmt.Errorf("bucket %s: %w", subjects.BucketDevices, err)
	}
	if _, err := devKV.Get(ctx, id); errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, false, fmt.Errorf("%w %s: no such device record (fleet-admin devices ls lists them)", ErrUnknownDevice, id)
	} else if err != nil {
		return nil, 0, false, fmt.Errorf("read device %s: %w", id, err)
	}
	cfg := jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{subjects.DeviceFacts(id)},
		NamePrefix:     "fleet-facts-history",
		// Gone soon even if the delete below does not get through.
		InactiveThreshold: 30 * time.Second,
	}
	if after > 0 {
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = after + 1
	} else {
		start := time.Now().Add(-since)
		cfg.DeliverPolicy = jetstream.DeliverByStartTimePolicy
		cfg.OptStartTime = &start
	}
	cons, err := c.js.OrderedConsumer(ctx, subjects.StreamFacts, cfg)
	if err != nil {
		return nil, 0, false, fmt.Errorf("read facts of %s: %w", id, err)
	}
	info, err := cons.Info(ctx)
	if err != nil {
		return nil, 0, false, fmt.Errorf("read facts of %s: %w", id, err)
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		// Each Fetch of an ordered consumer makes a new server-side
		// consumer; delete the last one.
		if ci := cons.CachedInfo(); ci != nil {
			_ = c.js.DeleteConsumer(dctx, subjects.StreamFacts, ci.Name)
		}
	}()
	// Read what was stored when the consumer was made; later reports wait
	// for the next call.
	pending := int(info.NumPending)
	want := min(pending, limit)
	out := make([]model.Facts, 0, want)
	size := 0
	for read := 0; read < want; {
		batch, err := cons.Fetch(min(want-read, 200), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			return nil, 0, false, fmt.Errorf("read facts of %s: %w", id, err)
		}
		n := 0
		for m := range batch.Messages() {
			if read >= want {
				break
			}
			if len(out) > 0 && size+len(m.Data()) > maxPageBytes {
				return out, last, true, nil // full: the rest on the next page
			}
			md, err := m.Metadata()
			if err != nil {
				return nil, 0, false, fmt.Errorf("read facts of %s: %w", id, err)
			}
			n++
			read++
			last = md.Sequence.Stream
			var f model.Facts
			if json.Unmarshal(m.Data(), &f) != nil {
				continue // a report no agent could have sent; skip it
			}
			f.Device = id
			size += len(m.Data())
			out = append(out, f)
		}
		if err := batch.Error(); err != nil && !errors.Is(err, jetstream.ErrNoMessages) {
			return nil, 0, false, fmt.Errorf("read facts of %s: %w", id, err)
		}
		if n == 0 { // stored, but not delivered in time: go on next page
			return out, last, last > 0 && read < pending, nil
		}
		if ctx.Err() != nil {
			return nil, 0, false, ctx.Err()
		}
	}
	return out, last, pending > want && last > 0, nil
}
