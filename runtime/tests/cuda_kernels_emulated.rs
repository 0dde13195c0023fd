//! The CUDA kernels' logic checked on the CPU, no GPU needed: the `.cu`
//! sources are compiled as C++ together with a small CUDA execution model
//! (`tests/cuda_emu/emu.h`: one OS thread per CUDA thread, barriers for
//! `__syncthreads` and warp shuffles) and run against plain reference loops
//! (`tests/cuda_emu/tests.cpp`): paging and block tables, GQA head mapping,
//! causal masks after a cached prefix, tiling and the online softmax, RoPE in
//! both orders, the sampling thresholds. It says nothing about speed, memory
//! ordering on a real GPU, or NVRTC (see `cuda_kernels_compile.rs`).

use std::path::Path;
use std::process::Command;

use xpyd_runtime::engine::cuda::kernels;

#[test]
fn kernels_match_reference_loops_on_the_cpu_model() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read =
        |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let kdir = root.join("src/engine/cuda/kernels");
    let mut tu = read(&root.join("tests/cuda_emu/emu.h"));
    tu += &read(&kdir.join("common.cuh"));
    for k in kernels::ALL {
        // Dynamic shared memory becomes the model's static buffer.
        tu += &read(&kdir.join(format!("{}.cu", k.name))).replace(
            "extern __shared__ float smem[];",
            "float* smem = emu_dynamic_smem;",
        );
    }
    tu += &read(&root.join("tests/cuda_emu/tests.cpp"));

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("kernels_emulated.cpp");
    let exe = dir.path().join("kernels_emulated");
    std::fs::write(&src, tu).unwrap();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let build = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O1",
            "-pthread",
            "-Wno-unknown-pragmas",
            "-o",
        ])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run the C++ compiler {cxx:?} (g++ is part of every build machine): {e}")
        });
    assert!(
        build.status.success(),
        "the kernels do not compile as C++ under tests/cuda_emu/emu.h:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}");
    assert!(
        run.status.success(),
        "kernel checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("0 failed"), "{stdout}");
}
