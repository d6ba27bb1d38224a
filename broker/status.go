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

// maxFactsHistory bounds what one FactsHistory call returns.
const maxFactsHistory = 10000

// ErrUnknownDevice is returned for a device ID without a record.
var ErrUnknownDevice = errors.New("unknown device")

// FactsHistory returns device id's fact reports stored since now-since,
// oldest first, at most the stream's per-device history (and never more
// than 10000). It reads FLEET_FACTS with one short-lived ordered consumer
// filtered to the device's subject.
func (c *Coordinator) FactsHistory(ctx context.Context, id string, since time.Duration) ([]model.Facts, error) {
	if err := subjects.CheckDeviceID(id); err != nil {
		return nil, err
	}
	if since <= 0 {
		return nil, fmt.Errorf("since %s: must be a positive duration, e.g. 24h", since)
	}
	devKV, err := c.js.KeyValue(ctx, subjects.BucketDevices)
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", subjects.BucketDevices, err)
	}
	if _, err := devKV.Get(ctx, id); errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, fmt.Errorf("%w %s: no such device record (fleet-admin devices ls lists them)", ErrUnknownDevice, id)
	} else if err != nil {
		return nil, fmt.Errorf("read device %s: %w", id, err)
	}
	limit := min(maxFactsHistory, int(min(c.cfg.FactsHistory, maxFactsHistory)))
	if limit <= 0 {
		limit = maxFactsHistory
	}
	start := time.Now().Add(-since)
	cons, err := c.js.OrderedConsumer(ctx, subjects.StreamFacts, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{subjects.DeviceFacts(id)},
		DeliverPolicy:  jetstream.DeliverByStartTimePolicy,
		OptStartTime:   &start,
		NamePrefix:     "fleet-facts-history",
		// Gone soon even if the delete below does not get through.
		InactiveThreshold: 30 * time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("read facts of %s: %w", id, err)
	}
	info, err := cons.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("read facts of %s: %w", id, err)
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
	want := min(int(info.NumPending), limit)
	out := make([]model.Facts, 0, want)
	for read := 0; read < want; {
		batch, err := cons.Fetch(want-read, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			return nil, fmt.Errorf("read facts of %s: %w", id, err)
		}
		n := 0
		for m := range batch.Messages() {
			n++
			read++
			var f model.Facts
			if json.Unmarshal(m.Data(), &f) != nil {
				continue // a report no agent could have sent; skip it
			}
			f.Device = id
			out = append(out, f)
		}
		if err := batch.Error(); err != nil && !errors.Is(err, jetstream.ErrNoMessages) {
			return nil, fmt.Errorf("read facts of %s: %w", id, err)
		}
		if n == 0 {
			break
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
	return out, nil
}
