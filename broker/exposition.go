package broker

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	pmodel "github.com/prometheus/common/model"
)

// The device index's families are written straight into the text
// exposition format rather than through a prometheus.Registry: at 10,000
// devices they are about 100,000 series, and building a const metric, a
// protobuf message and a sorted family for each cost 0.8 s of CPU and
// 100 MB of garbage a scrape. Written here, one pass over a snapshot.

// exposition writes families in the Prometheus text format (0.0.4).
type exposition struct {
	out io.Writer
	buf []byte
	err error
}

// exposFlush is how much the writer buffers before writing out.
const exposFlush = 64 << 10

// family starts a family: its HELP and TYPE lines. Its samples follow.
func (e *exposition) family(f family) {
	name, help, typ := f.name, f.help, f.typ
	e.buf = append(e.buf, "# HELP "...)
	e.buf = append(e.buf, name...)
	e.buf = append(e.buf, ' ')
	e.buf = appendEscaped(e.buf, help, false)
	e.buf = append(e.buf, "\n# TYPE "...)
	e.buf = append(e.buf, name...)
	e.buf = append(e.buf, ' ')
	e.buf = append(e.buf, strings.ToLower(typ.String())...)
	e.buf = append(e.buf, '\n')
}

// sample writes one series: labels are name, value pairs.
func (e *exposition) sample(name string, v float64, labels ...string) {
	e.buf = append(e.buf, name...)
	if len(labels) > 0 {
		e.buf = append(e.buf, '{')
		for i := 0; i+1 < len(labels); i += 2 {
			if i > 0 {
				e.buf = append(e.buf, ',')
			}
			e.buf = append(e.buf, labels[i]...)
			e.buf = append(e.buf, `="`...)
			e.buf = appendEscaped(e.buf, labels[i+1], true)
			e.buf = append(e.buf, '"')
		}
		e.buf = append(e.buf, '}')
	}
	e.buf = append(e.buf, ' ')
	switch {
	case math.IsNaN(v):
		e.buf = append(e.buf, "NaN"...)
	case math.IsInf(v, 1):
		e.buf = append(e.buf, "+Inf"...)
	case math.IsInf(v, -1):
		e.buf = append(e.buf, "-Inf"...)
	default:
		e.buf = strconv.AppendFloat(e.buf, v, 'g', -1, 64)
	}
	e.buf = append(e.buf, '\n')
	if len(e.buf) >= exposFlush {
		e.flush()
	}
}

// flush writes out what is buffered; the first error sticks.
func (e *exposition) flush() error {
	if e.err == nil && len(e.buf) > 0 {
		_, e.err = e.out.Write(e.buf)
	}
	e.buf = e.buf[:0]
	return e.err
}

// appendEscaped appends s escaped for a HELP text or (quoted) a label
// value. Bytes that are not UTF-8 become U+FFFD: a device's name is its
// own choice, and one bad label would fail the whole scrape.
func appendEscaped(b []byte, s string, quoted bool) []byte {
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\\':
			b = append(b, `\\`...)
		case c == '\n':
			b = append(b, `\n`...)
		case c == '"' && quoted:
			b = append(b, `\"`...)
		default:
			b = append(b, c)
		}
	}
	return b
}

// textCollector writes families of its own into an exposition.
type textCollector interface {
	writeText(e *exposition)
}

// metricsGatherer is the coordinator's metrics as one Gatherer: the
// registry and the families written as text (parsed back, which only
// tests and promvalue do; a scrape takes the text as it is).
type metricsGatherer struct {
	reg  *prometheus.Registry
	text []textCollector
	// errs counts scrapes that could gather the registry only in part.
	errs prometheus.Counter
}

// newMetricsGatherer registers the scrape error counter in reg.
func newMetricsGatherer(reg *prometheus.Registry, text ...textCollector) metricsGatherer {
	g := metricsGatherer{reg: reg, text: text, errs: prometheus.NewCounter(prometheus.CounterOpts{
		Name: "fleet_metrics_gather_errors_total", Help: "Scrapes of /metrics that left out a family that failed to gather.",
	})}
	reg.MustRegister(g.errs)
	return g
}

// Gather is prometheus.Gatherers over the registry and the parsed text,
// which also refuses a family that both produce (the handler would serve
// it twice, and a scraper's parser refuse the page: tests gather).
func (g metricsGatherer) Gather() ([]*dto.MetricFamily, error) {
	return prometheus.Gatherers{g.reg, prometheus.GathererFunc(g.gatherText)}.Gather()
}

func (g metricsGatherer) gatherText() ([]*dto.MetricFamily, error) {
	var b bytes.Buffer
	if err := g.writeText(&b); err != nil {
		return nil, err
	}
	p := expfmt.NewTextParser(pmodel.UTF8Validation)
	fams, err := p.TextToMetricFamilies(&b)
	if err != nil {
		return nil, fmt.Errorf("parse the text families: %w", err)
	}
	out := make([]*dto.MetricFamily, 0, len(fams))
	for _, f := range fams {
		out = append(out, f)
	}
	return out, nil
}

func (g metricsGatherer) writeText(w io.Writer) error {
	e := &exposition{out: w, buf: make([]byte, 0, exposFlush+4096)}
	for _, t := range g.text {
		t.writeText(e)
	}
	return e.flush()
}

// textContentType is the text exposition format, which every Prometheus
// accepts.
var textContentType = string(expfmt.NewFormat(expfmt.TypeTextPlain))

// metricsHandler serves g in the text format, gzipped when the scraper
// accepts it, at most maxScrapes at once.
func metricsHandler(g metricsGatherer) http.Handler {
	const maxScrapes = 4
	sem := make(chan struct{}, maxScrapes)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case sem <- struct{}{}:
			defer func() { <-sem }()
		default:
			http.Error(w, fmt.Sprintf("%d scrapes already in flight; try again later", maxScrapes), http.StatusServiceUnavailable)
			return
		}
		// The registry first: gathering it can fail in part (a family
		// that errs is left out, the rest still served).
		fams, err := g.reg.Gather()
		if err != nil {
			g.errs.Inc()
		}
		h := w.Header()
		h.Set("Content-Type", textContentType)
		h.Add("Vary", "Accept-Encoding")
		var out io.Writer = w
		if acceptsGzip(r.Header.Get("Accept-Encoding")) {
			h.Set("Content-Encoding", "gzip")
			zw, _ := gzip.NewWriterLevel(w, gzip.BestSpeed)
			defer zw.Close()
			out = zw
		}
		enc := expfmt.NewEncoder(out, expfmt.NewFormat(expfmt.TypeTextPlain))
		for _, f := range fams {
			if err := enc.Encode(f); err != nil {
				return // the scraper went away
			}
		}
		if err := g.writeText(out); err != nil {
			return
		}
	})
}

// acceptsGzip reports whether an Accept-Encoding header allows gzip.
func acceptsGzip(h string) bool {
	for part := range strings.SplitSeq(h, ",") {
		coding, params, _ := strings.Cut(strings.TrimSpace(part), ";")
		if !strings.EqualFold(strings.TrimSpace(coding), "gzip") {
			continue
		}
		if q, ok := strings.CutPrefix(strings.ReplaceAll(params, " ", ""), "q="); ok {
			if v, err := strconv.ParseFloat(q, 64); err == nil && v == 0 {
				return false
			}
		}
		return true
	}
	return false
}

// family is a metric family written as text.
type family struct {
	name, help string
	typ        dto.MetricType
}
