//! The images built here (`xpyd_e2e::images`) against the `Dockerfile`, the
//! recipe for users with Docker: for the `agent` and `operator` targets, the
//! entrypoint, command, user, exposed ports and env the Dockerfile declares
//! are what crane reports in the config of the image built here. The
//! binaries are stand-ins: only the config is compared.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use xpyd_e2e::images::{ImageSpec, workload};
use xpyd_e2e::{ImageRegistry, NodeTools, Workdir};

/// What a Dockerfile stage declares about the image's config.
#[derive(Debug, Default)]
struct Stage {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    user: String,
    ports: BTreeSet<String>,
    env: Vec<String>,
}

/// The instructions of stage `name` (`FROM … AS name`), continuation lines
/// joined.
fn stage(dockerfile: &str, name: &str) -> Stage {
    let joined = dockerfile.replace("\\\n", " ");
    let mut lines = joined.lines().map(str::trim);
    let header = format!(" AS {name}");
    lines
        .by_ref()
        .find(|l| l.starts_with("FROM ") && l.ends_with(&header))
        .unwrap_or_else(|| panic!("no stage {name} in the Dockerfile"));
    let json = |rest: &str| -> Vec<String> {
        serde_json::from_str(rest).unwrap_or_else(|e| panic!("{rest}: not exec form: {e}"))
    };
    let mut stage = Stage::default();
    for line in lines.take_while(|l| !l.starts_with("FROM ")) {
        let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
        match op {
            "ENTRYPOINT" => stage.entrypoint = json(rest),
            "CMD" => stage.cmd = json(rest),
            "USER" => stage.user = rest.trim().to_string(),
            "EXPOSE" => stage
                .ports
                .extend(rest.split_whitespace().map(|p| format!("{p}/tcp"))),
            "ENV" => stage.env.push(rest.trim().to_string()),
            _ => {}
        }
    }
    stage
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_matches(target: &str, want: &Stage, config: &Value) {
    let c = &config["config"];
    assert_eq!(
        strings(&c["Entrypoint"]),
        want.entrypoint,
        "{target}: entrypoint"
    );
    assert_eq!(strings(&c["Cmd"]), want.cmd, "{target}: cmd");
    assert_eq!(
        c["User"].as_str().unwrap_or(""),
        want.user,
        "{target}: user"
    );
    let ports: BTreeSet<String> = c["ExposedPorts"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    assert_eq!(ports, want.ports, "{target}: exposed ports");
    let env = strings(&c["Env"]);
    for kv in &want.env {
        assert!(env.contains(kv), "{target}: env {kv} missing from {env:?}");
    }
    assert!(
        env.iter().any(|e| e.starts_with("PATH=")),
        "{target}: no PATH in {env:?}"
    );
    assert_eq!(config["os"], "linux", "{target}: platform");
    assert_eq!(config["architecture"], "amd64", "{target}: platform");
}

#[tokio::test]
async fn the_images_built_here_have_the_config_the_dockerfile_declares() {
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile"))
            .expect("read the Dockerfile");
    let tools = NodeTools::locate().expect("scripts/setup node");
    let dir = Workdir::new("image-drift").unwrap();
    let registry = ImageRegistry::start(&tools.crane, dir.path())
        .await
        .unwrap();
    let client = registry
        .client()
        .with_cache_dir(&dir.subdir("cache").unwrap());
    // Stand-ins: a small dynamically linked binary, an empty NIXL folder.
    let stand_in = Path::new("/bin/true");
    let nixl = dir.subdir("nixl/lib").unwrap();
    let specs: [(&str, ImageSpec); 2] = [
        ("agent", workload::agent(stand_in, &nixl, "drift")),
        ("operator", workload::operator(stand_in, "drift")),
    ];
    for (target, spec) in specs {
        let client = client.clone();
        let config = tokio::task::spawn_blocking(move || {
            let image = client.push(&spec)?;
            client.config(&image)
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("build {target}: {e}"));
        assert_matches(target, &stage(&dockerfile, target), &config);
    }
}

#[test]
fn a_dockerfile_stage_is_read_with_its_continuations() {
    let text = "FROM a AS build\nUSER 1\nFROM b AS x\nENV K=v\nEXPOSE 1 \\\n 2\n\
                ENTRYPOINT [\"/x\"]\nCMD [\"run\"]\nUSER 65532:65532\n";
    let s = stage(text, "x");
    assert_eq!(s.entrypoint, ["/x"]);
    assert_eq!(s.cmd, ["run"]);
    assert_eq!(s.user, "65532:65532");
    assert_eq!(s.env, ["K=v"]);
    assert_eq!(
        s.ports,
        BTreeSet::from(["1/tcp".to_string(), "2/tcp".to_string()])
    );
}
