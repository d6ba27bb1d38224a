package broker

import (
	"net"
	"os"
	"reflect"
	"strings"
	"testing"
)

// The HTTP listener's default port is one place's decision: the flag, the
// config default, the NixOS module, the Prometheus scrape config, the
// Grafana provisioning and the README all name the same address, and it is
// not node_exporter's 9100 (which runs on many of the same hosts).
func TestHTTPDefaultPortEverywhere(t *testing.T) {
	def := DefaultConfig().HTTP
	_, port, err := net.SplitHostPort(def)
	if err != nil {
		t.Fatal(err)
	}
	if port == "9100" {
		t.Fatalf("default --http %s takes node_exporter's port", def)
	}
	f, _ := reflect.TypeFor[RunCmd]().FieldByName("HTTP")
	if got := f.Tag.Get("default"); got != def {
		t.Errorf("flag default %q, config default %q", got, def)
	}
	for _, file := range []string{"../nixos-modules/coordinator.nix", "../prometheus/fleet-scrape.yml",
		"../grafana/provisioning/datasources/fleet.yaml", "../README.md", "../nixos-modules/README.md", "../nixos-modules/tests/fleet.nix"} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), def) {
			t.Errorf("%s does not name the default %s", file, def)
		}
		if strings.Contains(string(b), ":9100") {
			t.Errorf("%s still names port 9100", file)
		}
	}
}
