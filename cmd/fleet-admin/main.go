// Command fleet-admin is the fleet's command line for people and CI. See
// `fleet-admin --help`.
package main

import (
	"os"

	"fleet/admin"
)

func main() { os.Exit(admin.Main(os.Args[1:])) }
