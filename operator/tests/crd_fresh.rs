//! The CRD checked in under `crds/` is the one the Rust types generate.

#[test]
fn the_checked_in_crd_matches_the_rust_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crds/disaggdeployments.xpyd.dev.yaml");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = xpyd_operator::crd::crd_yaml().expect("the CRD serializes");
    assert!(
        checked_in == generated,
        "{} is stale or missing; regenerate it with\n  \
         cargo run -p xpyd-operator -- crd > crds/disaggdeployments.xpyd.dev.yaml",
        path.display()
    );
}
