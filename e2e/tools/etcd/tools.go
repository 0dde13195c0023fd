//go:build tools

// Package tools pins the etcd command that scripts/setup builds.
package tools

import _ "go.etcd.io/etcd/server/v3"
