// The pause program of the real node's pod sandboxes (what registry.k8s.io/pause
// is elsewhere): no registry is reachable here, so it is built here.
// Built by scripts/setup (part `node`); never part of the product.
module xpyd.dev/e2e-tools/pause

go 1.26.0
