package broker

import (
	"bytes"
	"compress/gzip"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	pmodel "github.com/prometheus/common/model"
)

// textOf is a textCollector from a function.
type textOf func(e *exposition)

func (f textOf) writeText(e *exposition) { f(e) }

// parseText parses text exposition as Prometheus's own parser does.
func parseText(t testing.TB, b []byte) map[string]*dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(pmodel.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("parse: %v\n%s", err, b)
	}
	return fams
}

// FuzzExpositionLabel: whatever a device calls itself (its name is a
// label value and it chooses it), the page parses and the label reads back
// as sent, or with U+FFFD for bytes that are not UTF-8.
func FuzzExpositionLabel(f *testing.F) {
	for _, s := range []string{"", "laptop-1", `a"b`, `back\slash`, "new\nline", "\xff\xfe", `\"` + "\n", "}{=,", "日本"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		var b bytes.Buffer
		e := &exposition{out: &b}
		e.family(family{"fleet_test_info", `Help with a \ and a` + "\nnew line.", dto.MetricType_GAUGE})
		e.sample("fleet_test_info", 1, "device", "d1", "name", name)
		if err := e.flush(); err != nil {
			t.Fatal(err)
		}
		fam := parseText(t, b.Bytes())["fleet_test_info"]
		if fam == nil || len(fam.Metric) != 1 {
			t.Fatalf("family: %v\n%s", fam, b.Bytes())
		}
		want := strings.ToValidUTF8(name, "\uFFFD")
		for _, l := range fam.Metric[0].Label {
			if l.GetName() == "name" && l.GetValue() != want {
				t.Fatalf("name label %q, want %q", l.GetValue(), want)
			}
		}
		if got, want := fam.GetHelp(), `Help with a \ and a`+"\nnew line."; got != want {
			t.Fatalf("help %q, want %q", got, want)
		}
	})
}

// The handler serves the registry and the text families as one page,
// plain or gzipped, and the Gatherer view (what tests and promvalue read)
// has the same series.
func TestMetricsHandlerServesBoth(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "fleet_test_total", Help: "A counter."})
	reg.MustRegister(c)
	c.Add(3)
	g := newMetricsGatherer(reg, textOf(func(e *exposition) {
		e.family(family{"fleet_test_devices", "Devices.", dto.MetricType_GAUGE})
		for i, name := range []string{"a", "b\"c", "d\\e"} {
			e.sample("fleet_test_devices", float64(i)+0.5, "name", name)
		}
	}))
	h := metricsHandler(g)
	for _, gz := range []bool{false, true} {
		req := httptest.NewRequest("GET", "/metrics", nil)
		if gz {
			req.Header.Set("Accept-Encoding", "gzip")
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != textContentType {
			t.Fatalf("gzip %v: %d %q", gz, rec.Code, rec.Header().Get("Content-Type"))
		}
		body := rec.Body.Bytes()
		if gz {
			if rec.Header().Get("Content-Encoding") != "gzip" {
				t.Fatalf("asked for gzip, got %q", rec.Header().Get("Content-Encoding"))
			}
			zr, err := gzip.NewReader(bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			if body, err = io.ReadAll(zr); err != nil {
				t.Fatal(err)
			}
		}
		fams := parseText(t, body)
		if v := fams["fleet_test_total"].GetMetric()[0].GetCounter().GetValue(); v != 3 {
			t.Errorf("gzip %v: counter %v", gz, v)
		}
		if n := len(fams["fleet_test_devices"].GetMetric()); n != 3 {
			t.Errorf("gzip %v: %d device series", gz, n)
		}
	}
	fams, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]int{}
	for _, f := range fams {
		names[f.GetName()] = len(f.GetMetric())
	}
	if names["fleet_test_total"] != 1 || names["fleet_test_devices"] != 3 {
		t.Errorf("gathered %v", names)
	}

	// A family both in the registry and in the text is refused, not
	// served twice.
	dup := newMetricsGatherer(prometheus.NewRegistry(), textOf(func(e *exposition) {
		e.family(family{"fleet_metrics_gather_errors_total", "Again.", dto.MetricType_COUNTER})
		e.sample("fleet_metrics_gather_errors_total", 1)
	}))
	if _, err := dup.Gather(); err == nil {
		t.Error("a family written twice gathered without error")
	}
}

func TestAcceptsGzip(t *testing.T) {
	for h, want := range map[string]bool{
		"": false, "gzip": true, "GZIP": true, "identity": false, "br, gzip;q=0.5": true,
		"gzip;q=0": false, "gzip; q=0": false, "deflate, gzip;q=1.0": true, "xgzip": false,
	} {
		if got := acceptsGzip(h); got != want {
			t.Errorf("acceptsGzip(%q) = %v, want %v", h, got, want)
		}
	}
}
