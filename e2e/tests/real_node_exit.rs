//! A real node that is never dropped (one shared through a `static`, or
//! leaked) is still cleaned up when the test process exits: the harness'
//! exit hook stops its pods and puts the host back. The node runs in a child
//! process (this test binary, running the ignored test below), so the parent
//! can look at the host after the child has exited.
//!
//! A file of its own: test binaries run one after another, so no other real
//! node changes the host while this one compares it.

use std::time::Duration;

use xpyd_e2e::host::{sh_line, snapshot};
use xpyd_e2e::{ControlPlane, ControlPlaneOptions, RealNode};

const CHILD_TEST: &str = "child_starts_a_node_and_exits_without_dropping_it";

/// Runs in the child only (see the parent test below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_node_left_undropped_is_cleaned_up_at_process_exit"]
async fn child_starts_a_node_and_exits_without_dropping_it() {
    let plane = ControlPlane::start_for_real_node(ControlPlaneOptions {
        nodes: 0,
        gpus_per_node: 0,
    })
    .await
    .expect("control plane");
    let node = RealNode::start(&plane).await.expect("real node");
    // A pod runs (CoreDNS), with its mounts, cgroups and veth.
    println!("CHILD-NODE-DIR {}", node.dir().display());
    std::mem::forget(node);
    std::mem::forget(plane);
}

#[test]
fn a_node_left_undropped_is_cleaned_up_at_process_exit() {
    let before = host_state();
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = std::process::Command::new(exe)
        .args(["--exact", CHILD_TEST, "--ignored", "--nocapture"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the child test");
    // Deadline: the child starts a control plane and a node (seconds warm,
    // images built once), then exits.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the child test did not finish in 300 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node_dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CHILD-NODE-DIR "))
        .unwrap_or_else(|| panic!("the child printed no node folder: {stdout}"))
        .to_string();
    assert_eq!(host_state(), before, "the host after the child exited");
    assert!(
        !std::path::Path::new(&node_dir).exists(),
        "{node_dir} left behind"
    );
}

/// What a real node changes on the host ([`snapshot`]), and whether a shim
/// or pod process outlived it.
fn host_state() -> Vec<String> {
    let mut state = snapshot();
    state.push(sh_line(
        "pgrep -f '[c]ontainerd-shim-runc-v2 .*-address /tmp/xpyd-e2e' | wc -l",
    ));
    state
}
