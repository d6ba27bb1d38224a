# The fleet agent's config file, as a pure function of its settings.
#
# This file uses builtins only (no nixpkgs, no lib), so it can be evaluated
# anywhere `nix-instantiate` runs; agent/nixmodule_test.go evaluates it and
# checks the result against `fleet-agent run`'s own parser. agent.nix calls
# it with the values of services.fleet-agent.* and writes the result with
# builtins.toJSON.
#
#   (import ./agent-config.nix) { servers = [ "nats://hub:4222" ]; ... }
#     => { server = [ "nats://hub:4222" ]; ... }   # goes to builtins.toJSON
#
# Settings are named like the NixOS options (camelCase). A setting that is
# null, absent or empty ([ ], { }) is left out of the file, so the agent's
# own default applies. A map flag (recoveryKeys: --recovery-key DISK=FILE)
# is written as a JSON object, which kong reads as the map.
# An unknown setting name is an error, so a typo cannot be silently dropped.
#
# Key spelling. Every key is spelled as on the command line: flags of
# `fleet-agent run` (and global ones like log-level) are read by the agent's
# config loader (package cliconfig), which takes flag names as keys and
# refuses unknown keys; the structured settings with no flag (health-checks,
# health-deadline) are decoded by the agent's FileConfig.
let
  # NixOS option name -> flag name of `fleet-agent run` (or a global flag).
  flags = {
    servers = "server";
    stateDir = "state-dir";
    enrollmentTokenFile = "enroll-token-file";
    releaseSigners = "release-signer";
    hostname = "hostname";
    profile = "profile";
    currentSystem = "current-system";
    bootedSystem = "booted-system";
    factsInterval = "facts-interval";
    reconnectWithin = "reconnect-within";
    applyTimeout = "apply-timeout";
    recheck = "recheck";
    approvalPoll = "approval-poll";
    payloadDir = "payload-dir";
    recoveryKeys = "recovery-key";
    escrowKey = "escrow-key";
    logLevel = "log-level";
    logFormat = "log-format";
  };

  # NixOS option name -> json tag of agent.FileConfig (no flag).
  fileKeys = {
    healthChecks = "health-checks";
    healthDeadline = "health-deadline";
  };

  # Health check submodule option name -> json tag of agent.HealthCheck.
  checkKeys = {
    name = "name";
    type = "type";
    units = "units";
    url = "url";
    expectStatus = "expect-status";
    command = "command";
    timeout = "timeout";
    retries = "retries";
    interval = "interval";
  };

  # The config key of a flag: its name as on the command line.
  kongKey = flag: flag;

  # Absent, null, empty lists and empty attrsets mean "not set".
  isSet = v: v != null && v != [ ] && v != { };

  # Keep the set entries of attrs, renamed by names (option -> key).
  rename = what: names: attrs:
    let
      unknown = builtins.filter (n: !(builtins.hasAttr n names)) (builtins.attrNames attrs);
      set = builtins.filter (n: isSet attrs.${n}) (builtins.attrNames attrs);
    in
    if unknown != [ ] then
      throw "fleet agent config: unknown ${what} ${builtins.toJSON unknown}; known: ${builtins.toJSON (builtins.attrNames names)}"
    else
      builtins.listToAttrs (map (n: { name = names.${n}; value = attrs.${n}; }) set);

  healthCheck = hc: rename "health check setting" checkKeys hc;

  # healthChecks may be a list or an attrset (the NixOS option is attrsOf,
  # keyed by name); the file holds a list either way.
  healthChecks = hcs:
    map healthCheck (if builtins.isAttrs hcs then builtins.attrValues hcs else hcs);

  toConfig = settings:
    let
      flagSettings = builtins.removeAttrs settings (builtins.attrNames fileKeys);
      fileSettings = builtins.intersectAttrs fileKeys settings;
      flagPart = rename "setting" (builtins.mapAttrs (_: kongKey) flags) flagSettings;
      filePart = rename "setting" fileKeys (fileSettings
        // (if fileSettings ? healthChecks && fileSettings.healthChecks != null
            then { healthChecks = healthChecks fileSettings.healthChecks; }
            else { }));
    in
    flagPart // filePart;
in
{
  inherit flags fileKeys checkKeys kongKey;

  # Every setting this file maps, i.e. every services.fleet-agent option
  # that reaches the config file (agent.nix has these plus enable, package
  # and extraFlags).
  settingNames = builtins.attrNames flags ++ builtins.attrNames fileKeys;

  inherit toConfig;

  # The file can be called directly: (import ./agent-config.nix) settings.
  __functor = self: settings: self.toConfig settings;
}
