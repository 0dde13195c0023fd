//go:build tools

// Package tools pins the Kubernetes node commands that scripts/setup builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
