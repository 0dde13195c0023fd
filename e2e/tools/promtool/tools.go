//go:build tools

// Package tools pins the promtool command that scripts/setup builds.
package tools

import _ "github.com/prometheus/prometheus/cmd/promtool"
