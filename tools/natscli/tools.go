//go:build tools

// Package natscli pins the real `nats` command-line client (natscli), which
// the integration tests run as an independent client of the coordinator:
//
//	go build -o DIR/nats github.com/nats-io/natscli/nats
//
// run in this directory. It is a module of its own so that fleet's go.mod
// does not carry natscli's dependencies.
package natscli

import _ "github.com/nats-io/natscli/nats"
