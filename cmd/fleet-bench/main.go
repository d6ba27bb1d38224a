// Command fleet-bench measures a coordinator under a simulated fleet. See
// `fleet-bench --help` and BENCHMARKS.md.
package main

import (
	"os"

	"fleet/bench"
)

func main() { os.Exit(bench.Main(os.Args[1:], os.Stdout, os.Stderr)) }
