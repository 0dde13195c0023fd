//! The runtime's rooms import one way: agent → frontend → router/worker →
//! bus/discovery → transfer → engine, with `xpyd-api` beneath them all
//! (`docs/architecture.md`, "Rooms and imports"). This test reads the
//! sources of every room (`src/<room>/**/*.rs`) and fails on any
//! `crate::<room>` reference that [`ALLOWED`] does not list, naming the
//! file and the edge. Comments are not imports and are skipped.
//!
//! Modules outside the rooms (`assets`, `metrics`, `model_source`) are
//! shared helpers and not checked here.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Each room, top to bottom, with the rooms it may import. Rooms on one line
/// of the order (router/worker, bus/discovery) do not import each other.
const ALLOWED: &[(&str, &[&str])] = &[
    ("frontend", &["router", "bus", "discovery", "engine"]),
    ("router", &["bus", "discovery"]),
    ("worker", &["bus", "discovery", "transfer", "engine"]),
    ("bus", &[]),
    ("discovery", &[]),
    ("transfer", &["engine"]),
    ("engine", &[]),
];

/// The layer of each room in the order (higher imports lower).
fn layer(room: &str) -> usize {
    match room {
        "frontend" => 4,
        "router" | "worker" => 3,
        "bus" | "discovery" => 2,
        "transfer" => 1,
        "engine" => 0,
        other => panic!("{other} is not a room"),
    }
}

fn rooms() -> impl Iterator<Item = &'static str> {
    ALLOWED.iter().map(|(room, _)| *room)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The first path segments after `crate::` on one line of code:
/// `crate::engine::x` gives `engine`, `crate::{bus::Bus, engine}` gives
/// `bus` and `engine`.
fn crate_refs(code: &str) -> Vec<String> {
    let mut refs = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        // `xpyd_crate::` or `my_crate::` are other paths.
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        refs.push(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            refs.push(first_segment(&item));
        } else {
            refs.push(first_segment(rest));
        }
    }
    refs.retain(|r| !r.is_empty());
    refs
}

fn first_segment(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Every forbidden edge under `src`, as `file:line: room imports other`.
fn violations(src: &Path) -> Vec<String> {
    let room_names: BTreeSet<&str> = rooms().collect();
    let mut found = Vec::new();
    for (room, allowed) in ALLOWED {
        let mut files = Vec::new();
        rust_files(&src.join(room), &mut files);
        files.sort();
        for file in files {
            let text = fs::read_to_string(&file).unwrap_or_default();
            // `use crate::{…}` may span lines: join each statement's lines
            // by tracking open braces after `crate::{`.
            let mut pending = String::new();
            let mut pending_line = 0;
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                let (code, line_no) = if pending.is_empty() {
                    (code.to_string(), n + 1)
                } else {
                    pending.push(' ');
                    pending.push_str(code);
                    (std::mem::take(&mut pending), pending_line)
                };
                if let Some(at) = code.find("crate::{") {
                    let tail = &code[at..];
                    if tail.matches('{').count() > tail.matches('}').count() {
                        pending = code;
                        pending_line = line_no;
                        continue;
                    }
                }
                for other in crate_refs(&code) {
                    if other != *room
                        && room_names.contains(other.as_str())
                        && !allowed.contains(&other.as_str())
                    {
                        found.push(format!(
                            "{}:{line_no}: {room} imports {other} (crate::{other}); {room} may import only {allowed:?}",
                            file.display()
                        ));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn rooms_import_only_the_rooms_beneath_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for room in rooms() {
        assert!(src.join(room).is_dir(), "room {room} has no folder in src/");
    }
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "forbidden imports between rooms:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_allowed_edges_run_downhill() {
    for (room, allowed) in ALLOWED {
        for other in *allowed {
            assert!(
                layer(room) > layer(other),
                "{room} may import {other}, which is not beneath it"
            );
        }
    }
}

#[test]
fn a_forbidden_import_is_named_with_its_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |path: &str, text: &str| {
        let path = dir.path().join(path);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, text).expect("write");
    };
    write(
        "router/scheduler.rs",
        "use crate::engine::block_pool::PrefixHash;\nuse crate::bus::Bus;\n",
    );
    write(
        "frontend/cluster.rs",
        "use crate::{\n    bus::Bus,\n    worker::protocol::GenerateWork,\n};\n// crate::transfer in a comment is no import\n",
    );
    write(
        "discovery/mod.rs",
        "pub struct R { pub t: Option<crate::transfer::PeerInfo> }\n",
    );
    write("engine/mod.rs", "use xpyd_crate::router::X;\n");
    let found = violations(dir.path());
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(
        found[0].contains("frontend/cluster.rs:1: frontend imports worker"),
        "{}",
        found[0]
    );
    assert!(
        found[1].contains("router/scheduler.rs:1: router imports engine"),
        "{}",
        found[1]
    );
    assert!(
        found[2].contains("discovery/mod.rs:1: discovery imports transfer"),
        "{}",
        found[2]
    );
}
