//! A real ingress controller on the real node: Traefik, built from its Go
//! module (`e2e/tools/traefik`), run as a pod the way k3s runs it.
//!
//! Why Traefik: it builds from a Go module here (ingress-nginx needs
//! OpenResty, Contour and Emissary need Envoy, none of which build from a
//! Go module), k3s ships it, so many users meet it first, and it streams
//! server-sent events as they come: its proxy is Go's
//! `httputil.ReverseProxy`, which flushes `text/event-stream` responses at
//! once, so xpyd's streamed answers need no annotation. ingress-nginx users
//! need two (see `docs/ingress.md`).
//!
//! [`RealNode::start_traefik`] installs the RBAC, an `IngressClass` named
//! [`TRAEFIK_CLASS`], the Deployment and a NodePort Service on
//! [`TRAEFIK_NODE_PORT`], and returns once Traefik is Ready. Ingresses of
//! that class then answer on `http://<node ip>:<TRAEFIK_NODE_PORT>` for
//! their host. Traefik publishes the node's address in each Ingress's
//! status, as `kubectl get ingress` shows.

use std::net::SocketAddr;
use std::time::Duration;

use crate::control_plane::ControlPlane;
use crate::error::Result;
use crate::images::{ImageRef, system};
use crate::node::RealNode;
use crate::tools::NodeTools;

/// The `IngressClass` (and `spec.frontend.ingress.className`) Traefik serves.
pub const TRAEFIK_CLASS: &str = "traefik";
/// The NodePort of Traefik's `web` entry point (plain HTTP).
pub const TRAEFIK_NODE_PORT: u16 = 30080;
/// The namespace Traefik runs in.
pub const TRAEFIK_NAMESPACE: &str = "traefik";

const TRAEFIK_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running Traefik on the node.
#[derive(Debug, Clone)]
pub struct Traefik {
    http: SocketAddr,
}

impl Traefik {
    /// Where its `web` entry point answers: the node's address and
    /// [`TRAEFIK_NODE_PORT`]. Send the Ingress's host in the `Host` header
    /// (or resolve the host to this address).
    pub fn http(&self) -> SocketAddr {
        self.http
    }

    /// The `IngressClass` to name in an Ingress.
    pub fn class(&self) -> &'static str {
        TRAEFIK_CLASS
    }
}

impl RealNode {
    /// Pushes Traefik's image and runs it as the cluster's ingress
    /// controller (see the module doc); returns once it is Ready.
    pub async fn start_traefik(&self, plane: &ControlPlane) -> Result<Traefik> {
        let tools = NodeTools::locate()?;
        let image = self.push_image(system::traefik(&tools)).await?;
        self.kubectl(
            &["apply", "-f", "-"],
            Some(&traefik_manifest(&image, &self.ip().to_string())),
        )?;
        self.wait_deployment_ready(plane, TRAEFIK_NAMESPACE, "traefik", TRAEFIK_READY_TIMEOUT)
            .await?;
        Ok(Traefik {
            http: SocketAddr::new(self.ip().into(), TRAEFIK_NODE_PORT),
        })
    }
}

/// RBAC (Traefik's documented rules plus `nodes`, which 3.6 watches and
/// without which it routes nothing), the IngressClass, the
/// Deployment and its NodePort Service.
fn traefik_manifest(image: &ImageRef, node_ip: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: traefik, namespace: {ns}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: traefik-ingress-controller}}
rules:
  - apiGroups: [""]
    resources: [services, secrets, nodes]
    verbs: [get, list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [get, list, watch]
  - apiGroups: [extensions, networking.k8s.io]
    resources: [ingresses, ingressclasses]
    verbs: [get, list, watch]
  - apiGroups: [extensions, networking.k8s.io]
    resources: [ingresses/status]
    verbs: [update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: traefik-ingress-controller}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: traefik-ingress-controller}}
subjects: [{{kind: ServiceAccount, name: traefik, namespace: {ns}}}]
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {{name: {class}}}
spec: {{controller: traefik.io/ingress-controller}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: traefik, namespace: {ns}, labels: {{app: traefik}}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: traefik}}}}
  template:
    metadata: {{labels: {{app: traefik}}}}
    spec:
      serviceAccountName: traefik
      containers:
        - name: traefik
          image: {image}
          args:
            - --entryPoints.web.address=:8000
            - --entryPoints.traefik.address=:9000
            - --ping=true
            - --providers.kubernetesIngress=true
            - --providers.kubernetesIngress.ingressEndpoint.ip={node_ip}
            - --global.checkNewVersion=false
            - --global.sendAnonymousUsage=false
            - --accessLog=true
            - --log.level=INFO
            - --log.noColor=true
          ports:
            - {{name: web, containerPort: 8000}}
            - {{name: admin, containerPort: 9000}}
          resources:
            requests: {{cpu: 50m, memory: 50Mi}}
          readinessProbe:
            httpGet: {{path: /ping, port: 9000}}
            periodSeconds: 1
          livenessProbe:
            httpGet: {{path: /ping, port: 9000}}
            initialDelaySeconds: 30
            timeoutSeconds: 5
            failureThreshold: 5
---
apiVersion: v1
kind: Service
metadata: {{name: traefik, namespace: {ns}}}
spec:
  type: NodePort
  selector: {{app: traefik}}
  ports:
    - {{name: web, port: 80, targetPort: web, nodePort: {node_port}}}
"#,
        ns = TRAEFIK_NAMESPACE,
        class = TRAEFIK_CLASS,
        image = image.reference(),
        node_port = TRAEFIK_NODE_PORT,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traefik_manifest_names_the_image_class_port_and_address() {
        let image = ImageRef {
            repository: "127.0.0.1:5000/xpyd-e2e/traefik".into(),
            tag: "v3".into(),
        };
        let m = traefik_manifest(&image, "10.254.254.1");
        assert!(
            m.contains("image: 127.0.0.1:5000/xpyd-e2e/traefik:v3"),
            "{m}"
        );
        assert!(
            m.contains("controller: traefik.io/ingress-controller"),
            "{m}"
        );
        assert!(m.contains("nodePort: 30080"), "{m}");
        assert!(m.contains("ingressEndpoint.ip=10.254.254.1"), "{m}");
        for doc in m.split("\n---\n") {
            let v: serde_json::Value = serde_saphyr::from_str(doc)
                .unwrap_or_else(|e| panic!("YAML document does not parse: {e}\n{doc}"));
            assert!(v["kind"].is_string(), "{doc}");
        }
    }
}
