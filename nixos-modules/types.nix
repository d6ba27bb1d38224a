# Option types the fleet modules share. Plain lib only.
{ lib }:
let
  inherit (lib) types;
in
rec {
  # A Go duration ("30s", "1h30m").
  duration = types.strMatching "([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+";

  # A listen address with a port: "0.0.0.0:4222", "[::]:4222", ":4222".
  # A bare host ("0.0.0.0") is an option type error naming the option, not
  # a toInt failure where the port is read for the firewall.
  listenAddress = (types.strMatching "([^:]+|[[][0-9A-Fa-f:.]+[]])?:[0-9]{1,5}") // {
    description = "listen address with a port (host:port, [v6]:port or :port)";
  };

  # The port of a listenAddress.
  portOf = addr: lib.toInt (lib.last (lib.splitString ":" addr));
}
