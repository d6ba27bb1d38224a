# Example settings for the agent's config file; evaluated by
# agent/nixmodule_test.go into nixos-modules/agent-config.example.json:
#   nix-instantiate --eval --strict --json nixos-modules/tests/agent-config-example.nix
# Regenerate the fixture with: go test ./agent/ -run NixModule -update
let
  agentConfig = import ../agent-config.nix;
in
agentConfig {
  servers = [ "nats://fleet.example.org:4222" "nats://leaf.berlin.example.org:4222" ];
  stateDir = "/var/lib/fleet-agent";
  enrollmentTokenFile = "/etc/fleet/enroll-token";
  releaseSigners = [
    "UAEXAMPLEADMINKEYAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "UAEXAMPLECIKEYBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
  ];
  hostname = null; # the host's own name
  profile = "/nix/var/nix/profiles/system";
  currentSystem = "/run/current-system";
  bootedSystem = "/run/booted-system";
  factsInterval = "60s";
  reconnectWithin = "2m";
  applyTimeout = "30m";
  recheck = "15m";
  approvalPoll = "30s";
  payloadDir = "/run/fleet/payloads";
  # recoveryKeys (a map) is checked by integration/nixos_test.go: the
  # fixture check here compares strings, lists, numbers and booleans.
  recoveryKeys = { };
  escrowKey = "XDMN333ISMBVAKFHWQHHAUJ4G5ZOQZVG4SZLC2C25ENRXUOCPTCRIH7Q";
  logLevel = "info";
  logFormat = "json";
  healthDeadline = "5m";
  healthChecks = {
    nginx = {
      name = "nginx";
      type = "systemd";
      units = [ "nginx.service" "acme-finished-example.org.target" ];
      url = null;
      expectStatus = null;
      command = [ ];
      timeout = "10s";
      retries = 3;
      interval = "2s";
    };
    web = {
      name = "web";
      type = "http";
      units = [ ];
      url = "http://127.0.0.1:80/healthz";
      expectStatus = 200;
      command = [ ];
      timeout = "5s";
      retries = 5;
      interval = "3s";
    };
    disk = {
      name = "disk";
      type = "command";
      units = [ ];
      url = null;
      expectStatus = null;
      command = [ "/run/current-system/sw/bin/test" "-w" "/var/lib" ];
      timeout = null;
      retries = null;
      interval = null;
    };
  };
}
