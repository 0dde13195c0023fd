//! Container images built here, without Docker and without a public
//! registry, and the local registry a real node pulls them from.
//!
//! An image is one layer: a merged-/usr root (`/bin`, `/lib`, `/lib64`,
//! `/sbin` linking into `/usr`), the files an [`ImageSpec`] names, every
//! shared library `ldd` lists for its dynamically linked files (with the
//! loader, and `ldconfig -r` run on the tree), `/etc/passwd` with `root` and
//! the non-root `nonroot` (65532), and the host's CA certificates. crane
//! turns the tree into an image and sets its config (entrypoint, command,
//! env with PATH, user, exposed ports, platform); [`ImageRegistry`] is
//! crane's own registry on loopback, which containerd reaches over plain
//! HTTP. The built image is cached as a tarball under
//! `<cache>/images/`, keyed by the spec and the size and mtime of its input
//! files, so a second run only pushes it.
//!
//! The `Dockerfile` stays the recipe for users with Docker; the specs of the
//! agent and operator images here follow it, and a test compares the two.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{HarnessError, Result};
use crate::host::run_with_timeout;
use crate::process::{ServerProcess, free_port};

/// The PATH every image sets (Debian's, as in the Dockerfile's base images).
pub const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The non-root user in every image's /etc/passwd (distroless' `nonroot`).
pub const NONROOT_UID: u32 = 65532;

const REGISTRY_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Building or pushing one image (the agent's layer is a few hundred MB).
const CRANE_TIMEOUT: Duration = Duration::from_secs(300);
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// What goes into an image and its config.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// Repository path inside the registry, e.g. `xpyd/agent`.
    pub repository: String,
    pub tag: String,
    /// (host file, path in the image, resolve its shared libraries).
    files: Vec<(PathBuf, String, bool)>,
    /// (host folder, folder in the image): copied whole, with the shared
    /// libraries its `.so` files need from outside it.
    trees: Vec<(PathBuf, String)>,
    /// (link path in the image, target).
    links: Vec<(String, String)>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// Besides PATH, which every image gets.
    pub env: Vec<(String, String)>,
    /// `uid:gid` or empty for root.
    pub user: String,
    pub exposed_ports: Vec<u16>,
}

impl ImageSpec {
    pub fn new(repository: &str, tag: &str) -> ImageSpec {
        ImageSpec {
            repository: repository.to_string(),
            tag: tag.to_string(),
            ..ImageSpec::default()
        }
    }

    /// A file copied as is (static binaries, data).
    pub fn file(mut self, host: &Path, path: &str) -> Self {
        self.files
            .push((host.to_path_buf(), path.to_string(), false));
        self
    }

    /// An executable, with every shared library `ldd` lists for it.
    pub fn binary(mut self, host: &Path, path: &str) -> Self {
        self.files
            .push((host.to_path_buf(), path.to_string(), true));
        self
    }

    /// A folder copied whole, with the shared libraries its `.so` files need
    /// from outside it.
    pub fn tree(mut self, host: &Path, path: &str) -> Self {
        self.trees.push((host.to_path_buf(), path.to_string()));
        self
    }

    /// A symbolic link `path` → `target`.
    pub fn link(mut self, path: &str, target: &str) -> Self {
        self.links.push((path.to_string(), target.to_string()));
        self
    }

    pub fn entrypoint(mut self, args: &[&str]) -> Self {
        self.entrypoint = args.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = args.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn user(mut self, user: &str) -> Self {
        self.user = user.to_string();
        self
    }

    pub fn expose(mut self, ports: &[u16]) -> Self {
        self.exposed_ports.extend_from_slice(ports);
        self
    }

    /// Cache key: the spec and the size and mtime of every input file.
    fn key(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(format!("{self:?}").as_bytes());
        let mut stamp = |path: &Path| {
            if let Ok(meta) = std::fs::metadata(path) {
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or_default();
                hasher.update(format!("{} {} {mtime}\n", path.display(), meta.len()).as_bytes());
            }
        };
        for (host, _, _) in &self.files {
            stamp(host);
        }
        for (host, _) in &self.trees {
            for file in files_under(host) {
                stamp(&file);
            }
        }
        hasher
            .finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The config entries crane sets, as `crane mutate` flags.
    fn mutate_args(&self) -> Vec<String> {
        let mut args = vec!["--set-platform=linux/amd64".to_string()];
        args.extend(self.entrypoint.iter().map(|a| format!("--entrypoint={a}")));
        args.extend(self.cmd.iter().map(|a| format!("--cmd={a}")));
        args.push(format!("--env=PATH={IMAGE_PATH}"));
        args.extend(self.env.iter().map(|(k, v)| format!("--env={k}={v}")));
        if !self.user.is_empty() {
            args.push(format!("--user={}", self.user));
        }
        args.extend(
            self.exposed_ports
                .iter()
                .map(|p| format!("--exposed-ports={p}/tcp")),
        );
        args
    }
}

/// An image pushed to an [`ImageRegistry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `<registry>/<repository>`, as a chart's `image.repository` value.
    pub repository: String,
    pub tag: String,
}

impl ImageRef {
    /// `<repository>:<tag>`, as a pod's `image`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reference())
    }
}

/// crane's registry on loopback (`crane registry serve`), blobs on disk in
/// the owner's folder. Dropping it stops it.
#[derive(Debug)]
pub struct ImageRegistry {
    client: RegistryClient,
    process: ServerProcess,
}

/// Builds images and pushes them to one registry; cheap to clone, so it can
/// go to a blocking thread.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    crane: PathBuf,
    address: String,
    cache: PathBuf,
}

impl ImageRegistry {
    /// Starts a registry on a free loopback port, blobs under `dir`.
    pub async fn start(crane: &Path, dir: &Path) -> Result<ImageRegistry> {
        let port = free_port();
        let address = format!("127.0.0.1:{port}");
        let blobs = dir.join("registry-blobs");
        std::fs::create_dir_all(&blobs)
            .map_err(HarnessError::io(format!("create {}", blobs.display())))?;
        let mut process = ServerProcess::start(
            "registry",
            crane,
            [
                "registry".to_string(),
                "serve".to_string(),
                format!("--address={address}"),
                format!("--disk={}", blobs.display()),
            ],
            std::iter::empty::<(&str, &str)>(),
            dir.join("registry.log"),
        )?;
        process
            .wait_http_ready(
                &format!("http://{address}/v2/"),
                REGISTRY_READY_TIMEOUT,
                false,
                |_| true,
            )
            .await?;
        Ok(ImageRegistry {
            client: RegistryClient {
                crane: crane.to_path_buf(),
                address,
                cache: xpyd_runtime::assets::cache_dir().join("images"),
            },
            process,
        })
    }

    /// A client for pushing and inspecting images.
    pub fn client(&self) -> RegistryClient {
        self.client.clone()
    }

    /// Fails, with the log tail, if the registry has died.
    pub fn check_running(&mut self) -> Result<()> {
        self.process.check_running()
    }
}

impl RegistryClient {
    /// The same registry, with built images cached in `dir` rather than
    /// `<cache>/images` (for images of throwaway inputs).
    pub fn with_cache_dir(mut self, dir: &Path) -> Self {
        self.cache = dir.to_path_buf();
        self
    }

    /// `127.0.0.1:<port>`, the registry part of image references.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Builds the image (or takes it from the cache) and pushes it. Blocking:
    /// call it from `spawn_blocking` in async code.
    pub fn push(&self, spec: &ImageSpec) -> Result<ImageRef> {
        let image = ImageRef {
            repository: format!("{}/{}", self.address, spec.repository),
            tag: spec.tag.clone(),
        };
        let reference = image.reference();
        let tarball = self.build_cached(spec)?;
        self.crane(&["push", &tarball.to_string_lossy(), &reference])?;
        let mut args = vec!["mutate".to_string(), reference.clone()];
        args.extend(spec.mutate_args());
        args.push(format!("--tag={reference}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.crane(&args)?;
        tracing::info!(%reference, "image pushed");
        Ok(image)
    }

    /// The image's config as crane reports it (`crane config`).
    pub fn config(&self, image: &ImageRef) -> Result<serde_json::Value> {
        let text = self.crane(&["config", &image.reference()])?;
        serde_json::from_str(&text).map_err(|e| {
            HarnessError::Other(format!("crane config {image}: not JSON: {e}: {text}"))
        })
    }

    fn crane(&self, args: &[&str]) -> Result<String> {
        run_with_timeout(&self.crane.to_string_lossy(), args, None, CRANE_TIMEOUT)
            .map_err(|e| HarnessError::Other(format!("crane: {e}")))
    }

    /// The image as a tarball in the cache, built when missing.
    fn build_cached(&self, spec: &ImageSpec) -> Result<PathBuf> {
        let name = spec.repository.replace('/', "-");
        let tarball = self.cache.join(format!("{name}-{}.tar", spec.key()));
        if tarball.is_file() {
            return Ok(tarball);
        }
        std::fs::create_dir_all(&self.cache)
            .map_err(HarnessError::io(format!("create {}", self.cache.display())))?;
        let work = tempdir(&self.cache, &name)?;
        let result = (|| {
            let root = work.join("rootfs");
            build_rootfs(spec, &root)?;
            let layer = work.join("layer.tar");
            tar(&root, &layer)?;
            let partial = work.join("image.tar");
            self.crane(&[
                "append",
                "--oci-empty-base",
                "--new_layer",
                &layer.to_string_lossy(),
                "--new_tag",
                &format!("{}:{}", spec.repository, spec.tag),
                "--output",
                &partial.to_string_lossy(),
            ])?;
            std::fs::rename(&partial, &tarball)
                .map_err(HarnessError::io(format!("rename to {}", tarball.display())))?;
            // One cached image per repository: a new build replaces the old.
            prune(&self.cache, &format!("{name}-"), &tarball);
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&work);
        result.map(|_| tarball)
    }
}

/// Removes `<prefix><16 hex digits>.tar` files in `dir` other than `keep`.
fn prune(dir: &Path, prefix: &str, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let key = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(".tar"));
        if key.is_some_and(|k| k.len() == 16 && k.bytes().all(|b| b.is_ascii_hexdigit()))
            && entry.path() != keep
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn tempdir(parent: &Path, name: &str) -> Result<PathBuf> {
    let dir = parent.join(format!("{name}.partial.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(HarnessError::io(format!("create {}", dir.display())))?;
    Ok(dir)
}

/// Lays out the image's root folder.
fn build_rootfs(spec: &ImageSpec, root: &Path) -> Result<()> {
    let io =
        |what: &Path| HarnessError::io(format!("image {}: {}", spec.repository, what.display()));
    for dir in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "usr/local/bin",
        "etc/ssl/certs",
        "root",
        "home/nonroot",
        "tmp",
        "var/tmp",
    ] {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
    }
    for dir in ["tmp", "var/tmp"] {
        set_mode(&root.join(dir), 0o1777)?;
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        std::os::unix::fs::symlink(target, root.join(link)).map_err(io(&root.join(link)))?;
    }
    let write = |path: &str, text: &str| -> Result<()> {
        let p = root.join(path);
        std::fs::write(&p, text).map_err(io(&p))
    };
    write(
        "etc/passwd",
        &format!(
            "root:x:0:0:root:/root:/sbin/nologin\n\
             nonroot:x:{NONROOT_UID}:{NONROOT_UID}:nonroot:/home/nonroot:/sbin/nologin\n"
        ),
    )?;
    write(
        "etc/group",
        &format!("root:x:0:\nnonroot:x:{NONROOT_UID}:\n"),
    )?;
    write("etc/nsswitch.conf", "hosts: files dns\n")?;
    write(
        "etc/ld.so.conf",
        "/usr/local/lib\n/usr/lib/x86_64-linux-gnu\n/usr/lib64\n",
    )?;
    let certs = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if certs.is_file() {
        copy_into(certs, root, "/etc/ssl/certs/ca-certificates.crt")?;
    }
    std::os::unix::fs::chown(
        root.join("home/nonroot"),
        Some(NONROOT_UID),
        Some(NONROOT_UID),
    )
    .map_err(io(&root.join("home/nonroot")))?;

    let mut libs = Vec::new();
    for (host, path, resolve) in &spec.files {
        copy_into(host, root, path)?;
        if *resolve {
            libs.extend(shared_libraries(host, None)?);
        }
    }
    for (host, path) in &spec.trees {
        for file in files_under(host) {
            let rel = file
                .strip_prefix(host)
                .expect("files_under yields paths under it");
            copy_into(&file, root, &format!("{path}/{}", rel.display()))?;
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            if name.ends_with(".so") || name.contains(".so.") {
                libs.extend(shared_libraries(
                    &file,
                    Some(host.parent().unwrap_or(host)),
                )?);
            }
        }
    }
    libs.sort();
    libs.dedup();
    for lib in &libs {
        copy_into(lib, root, &lib.to_string_lossy())?;
    }
    for (link, target) in &spec.links {
        let p = root.join(link.trim_start_matches('/'));
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::os::unix::fs::symlink(target, &p).map_err(io(&p))?;
    }
    if !libs.is_empty() {
        run_with_timeout(
            "ldconfig",
            &["-r", &root.to_string_lossy()],
            None,
            TOOL_TIMEOUT,
        )?;
    }
    Ok(())
}

/// Copies `host` (following links) to `path` inside `root`, keeping its mode.
fn copy_into(host: &Path, root: &Path, path: &str) -> Result<()> {
    let dest = root.join(path.trim_start_matches('/'));
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .map_err(HarnessError::io(format!("create {}", parent.display())))?;
    }
    std::fs::copy(host, &dest).map_err(HarnessError::io(format!(
        "copy {} to {}",
        host.display(),
        dest.display()
    )))?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(HarnessError::io(format!("chmod {}", path.display())))
}

/// Regular files under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The libraries `ldd` lists for `file` (the loader included), except those
/// under `inside` (shipped with it) and those it cannot find (the GPU
/// driver's, which the node provides). Empty for a static file.
fn shared_libraries(file: &Path, inside: Option<&Path>) -> Result<Vec<PathBuf>> {
    let out = match run_with_timeout("ldd", &[&file.to_string_lossy()], None, TOOL_TIMEOUT) {
        Ok(out) => out,
        // "not a dynamic executable": nothing to add.
        Err(HarnessError::Other(e)) if e.contains("not a dynamic executable") => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    Ok(parse_ldd(&out)
        .into_iter()
        .filter(|lib| inside.is_none_or(|dir| !lib.starts_with(dir)))
        .collect())
}

fn parse_ldd(out: &str) -> Vec<PathBuf> {
    out.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim().split(' ').next()?,
                None => line.split(' ').next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The tree as one tar layer, owned by root.
fn tar(root: &Path, layer: &Path) -> Result<()> {
    let mut entries: Vec<String> = std::fs::read_dir(root)
        .map_err(HarnessError::io(format!("read {}", root.display())))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    let mut args = vec![
        "--numeric-owner".to_string(),
        "--owner=0".to_string(),
        "--group=0".to_string(),
        "-C".to_string(),
        root.to_string_lossy().into_owned(),
        "-cf".to_string(),
        layer.to_string_lossy().into_owned(),
    ];
    args.extend(entries);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_with_timeout("tar", &args, None, CRANE_TIMEOUT)?;
    Ok(())
}

/// The images a real node needs for itself: the pod sandbox's pause, CoreDNS,
/// Traefik (the ingress controller, pushed on demand) and a toolbox (busybox: sh, wget, nslookup, httpd) for tests to poke with.
pub mod system {
    use super::*;
    use crate::tools::NodeTools;

    pub fn pause(tools: &NodeTools) -> ImageSpec {
        ImageSpec::new("xpyd-e2e/pause", "1")
            .file(&tools.pause, "/pause")
            .entrypoint(&["/pause"])
    }

    pub fn coredns(tools: &NodeTools) -> ImageSpec {
        ImageSpec::new("xpyd-e2e/coredns", "v1")
            .file(&tools.coredns, "/coredns")
            .entrypoint(&["/coredns"])
            .expose(&[53])
    }

    /// Traefik, run as the nonroot user (it listens above 1024).
    pub fn traefik(tools: &NodeTools) -> ImageSpec {
        ImageSpec::new("xpyd-e2e/traefik", "v3")
            .file(&tools.traefik, "/traefik")
            .entrypoint(&["/traefik"])
            .user(&format!("{NONROOT_UID}:{NONROOT_UID}"))
            .expose(&[8000, 9000])
    }

    /// busybox with its applets linked on PATH.
    pub fn toolbox(tools: &NodeTools) -> ImageSpec {
        let mut spec = ImageSpec::new("xpyd-e2e/toolbox", "1")
            .file(&tools.busybox, "/usr/bin/busybox")
            .cmd(&["sh"]);
        for applet in [
            "sh", "ash", "cat", "echo", "env", "ls", "mkdir", "nc", "nslookup", "ps", "sleep",
            "wget", "httpd", "hostname", "ip", "true", "false", "test", "grep", "id",
        ] {
            spec = spec.link(&format!("/usr/bin/{applet}"), "busybox");
        }
        spec
    }
}

/// Images of the chart's workloads: the agent and operator from release
/// binaries (as the Dockerfile's `agent` and `operator` targets), and the
/// optional etcd and NATS.
pub mod workload {
    use super::*;

    /// Where the Dockerfile puts the NIXL libraries (`XPYD_NIXL_LIB_DIR`).
    pub const NIXL_DIR: &str = "/opt/nixl";

    /// `nixl_lib_dir` is the `lib/` folder setup unpacks (with its
    /// `plugins/`); the wheel's UCX in `../nixl_cu12.libs` comes along.
    pub fn agent(agent: &Path, nixl_lib_dir: &Path, tag: &str) -> ImageSpec {
        let mut spec = ImageSpec::new("xpyd/agent", tag)
            .binary(agent, "/usr/local/bin/xpyd-agent")
            .tree(nixl_lib_dir, &format!("{NIXL_DIR}/lib"))
            .entrypoint(&["/usr/local/bin/xpyd-agent"])
            .env("XPYD_NIXL_LIB_DIR", &format!("{NIXL_DIR}/lib"))
            .expose(&[9090, 8000]);
        if let Some(ucx) = nixl_lib_dir.parent().map(|p| p.join("nixl_cu12.libs"))
            && ucx.is_dir()
        {
            spec = spec.tree(&ucx, &format!("{NIXL_DIR}/nixl_cu12.libs"));
        }
        spec
    }

    pub fn operator(operator: &Path, tag: &str) -> ImageSpec {
        ImageSpec::new("xpyd/operator", tag)
            .binary(operator, "/usr/local/bin/xpyd-operator")
            .entrypoint(&["/usr/local/bin/xpyd-operator"])
            .cmd(&["run"])
            .user(&format!("{NONROOT_UID}:{NONROOT_UID}"))
            .expose(&[8080])
    }

    /// The chart runs `etcd` by name (charts/xpyd/templates/etcd.yaml).
    pub fn etcd(etcd: &Path, tag: &str) -> ImageSpec {
        ImageSpec::new("xpyd-e2e/etcd", tag)
            .binary(etcd, "/usr/local/bin/etcd")
            .expose(&[2379, 2380])
    }

    /// The chart runs `nats-server` by name (charts/xpyd/templates/nats.yaml).
    /// Debian's build is dynamically linked: its libraries come along.
    pub fn nats(nats: &Path, tag: &str) -> ImageSpec {
        ImageSpec::new("xpyd-e2e/nats", tag)
            .binary(nats, "/usr/local/bin/nats-server")
            .expose(&[4222, 8222])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_library_paths_and_the_loader() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f01)\n\
                   \tlibcuda.so.1 => not found\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f02)\n";
        assert_eq!(
            parse_ldd(out),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn the_config_flags_carry_path_entrypoint_user_and_ports() {
        let spec = ImageSpec::new("x/y", "1")
            .entrypoint(&["/bin/x"])
            .cmd(&["run"])
            .env("A", "b")
            .user("65532:65532")
            .expose(&[8080]);
        let args = spec.mutate_args();
        for want in [
            "--entrypoint=/bin/x",
            "--cmd=run",
            "--env=A=b",
            "--user=65532:65532",
            "--exposed-ports=8080/tcp",
            "--set-platform=linux/amd64",
        ] {
            assert!(
                args.iter().any(|a| a == want),
                "{want} missing from {args:?}"
            );
        }
        assert!(
            args.iter().any(|a| a.starts_with("--env=PATH=")),
            "{args:?}"
        );
    }

    #[test]
    fn a_new_build_replaces_the_cached_image_of_its_repository_only() {
        let dir = crate::Workdir::new("image-prune").unwrap();
        let file = |n: &str| dir.path().join(n);
        for n in [
            "xpyd-agent-0123456789abcdef.tar",
            "xpyd-agent-fedcba9876543210.tar",
            "xpyd-agent-extra-0123456789abcdef.tar",
            "xpyd-operator-0123456789abcdef.tar",
        ] {
            std::fs::write(file(n), b"x").unwrap();
        }
        prune(
            dir.path(),
            "xpyd-agent-",
            &file("xpyd-agent-fedcba9876543210.tar"),
        );
        assert!(!file("xpyd-agent-0123456789abcdef.tar").exists());
        assert!(file("xpyd-agent-fedcba9876543210.tar").exists());
        assert!(file("xpyd-agent-extra-0123456789abcdef.tar").exists());
        assert!(file("xpyd-operator-0123456789abcdef.tar").exists());
    }

    #[test]
    fn the_cache_key_follows_the_spec() {
        let a = ImageSpec::new("x/y", "1").entrypoint(&["/a"]);
        let b = ImageSpec::new("x/y", "1").entrypoint(&["/b"]);
        assert_eq!(a.key(), a.clone().key());
        assert_ne!(a.key(), b.key());
    }
}
