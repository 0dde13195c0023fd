//go:build tools

// Package tools pins the runc command that scripts/setup builds.
package tools

import (
	_ "github.com/opencontainers/runc"
)
