//go:build tools

// Package tools pins the CoreDNS command that scripts/setup builds.
package tools

import (
	_ "github.com/coredns/coredns"
)
