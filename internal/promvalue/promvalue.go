// Package promvalue reads one series' value out of a Prometheus registry:
// what a test asserts after a scrape, without an HTTP round trip.
package promvalue

import "github.com/prometheus/client_golang/prometheus"

// Get is the value of the first series of metric name whose labels include
// every pair of labels (a counter's or a gauge's), and whether one exists.
func Get(g prometheus.Gatherer, name string, labels map[string]string) (float64, bool, error) {
	fams, err := g.Gather()
	if err != nil {
		return 0, false, err
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
	next:
		for _, m := range f.GetMetric() {
			got := map[string]string{}
			for _, l := range m.GetLabel() {
				got[l.GetName()] = l.GetValue()
			}
			for k, v := range labels {
				if got[k] != v {
					continue next
				}
			}
			if c := m.GetCounter(); c != nil {
				return c.GetValue(), true, nil
			}
			return m.GetGauge().GetValue(), true, nil
		}
	}
	return 0, false, nil
}
