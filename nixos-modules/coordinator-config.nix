# The fleet coordinator's config file (`fleet-coordinator run --config`), as
# a pure function of its settings; builtins only, like agent-config.nix.
# Keys are flag names as on the command line ("data-dir"). Null or absent
# settings are left out, so the coordinator's own defaults apply; unknown
# settings are an error.
let
  # NixOS option name -> flag name of `fleet-coordinator run` (or global).
  flags = {
    dataDir = "data-dir";
    domain = "domain";
    listen = "listen";
    http = "http";
    leafnodeListen = "leafnode-listen";
    serverName = "server-name";
    clusterName = "cluster-name";
    clusterListen = "cluster-listen";
    routes = "routes";
    replicas = "replicas";
    factsRetention = "facts-retention";
    factsHistory = "facts-history";
    eventsRetention = "events-retention";
    apiTokenFile = "api-token-file";
    logLevel = "log-level";
    logFormat = "log-format";
  };
  kongKey = flag: flag;
  toConfig = settings:
    let
      unknown = builtins.filter (n: !(flags ? ${n})) (builtins.attrNames settings);
      set = builtins.filter (n: settings.${n} != null) (builtins.attrNames settings);
    in
    if unknown != [ ] then
      throw "fleet coordinator config: unknown setting ${builtins.toJSON unknown}"
    else
      builtins.listToAttrs (map (n: { name = kongKey flags.${n}; value = settings.${n}; }) set);
in
{
  inherit flags kongKey toConfig;
  settingNames = builtins.attrNames flags;
  __functor = self: settings: self.toConfig settings;
}
