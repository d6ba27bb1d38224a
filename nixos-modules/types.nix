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

  # An absolute path on the machine, outside the Nix store, given as a
  # string: for files that hold secrets (a recovery key) or that the
  # service writes. A Nix path literal (./key) or "${./key}" would copy the
  # file into the world-readable, read-only store, so both are refused.
  hostPath = (types.addCheck (types.strMatching "/.+")
    (p: !lib.hasPrefix "${builtins.storeDir}/" p)) // {
    description = "absolute path outside the Nix store (a string, not a Nix path)";
  };

  # A block device as the agent's facts name it: its kernel name, as
  # `lsblk` prints it (nvme0n1p2, sda2), without /dev/
  # (model.CheckDisk).
  isDiskName = d: builtins.stringLength d <= 128
    && builtins.match "[A-Za-z0-9_-]([A-Za-z0-9_./-]*[A-Za-z0-9_-])?" d != null;

  # The port of a listenAddress.
  portOf = addr: lib.toInt (lib.last (lib.splitString ":" addr));
}
