//go:build tools

// Package tools pins the crane command (go-containerregistry) that scripts/setup builds.
package tools

import (
	_ "github.com/google/go-containerregistry/cmd/crane"
)
