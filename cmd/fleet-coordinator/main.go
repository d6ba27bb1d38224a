// Command fleet-coordinator runs the fleet's coordinator: an embedded NATS
// JetStream server and the services built on it. See `fleet-coordinator
// --help`.
package main

import (
	"os"

	"fleet/broker"
)

func main() { os.Exit(broker.Main(os.Args[1:])) }
