//! Every CUDA kernel source compiles to PTX for sm_90 with NVRTC, on any
//! machine (no GPU needed): NVRTC comes from `scripts/setup`
//! (`XPYD_NVRTC_LIB_DIR`). A compile error names the kernel and NVRTC's line.

use xpyd_runtime::engine::cuda::kernels::{self, KernelSource};
use xpyd_runtime::engine::cuda::nvrtc::{self, DEFAULT_ARCH, NvrtcError};

#[test]
fn every_kernel_compiles_for_sm_90() {
    let (major, minor) = nvrtc::version().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("NVRTC {major}.{minor}");
    assert_eq!(major, 13, "cudarc is built for CUDA 13 (cuda-13000)");
    for k in kernels::ALL {
        let ptx = nvrtc::compile_kernel(k, DEFAULT_ARCH)
            .unwrap_or_else(|e| panic!("{}.cu did not compile:\n{e}", k.name));
        let text = ptx.to_src();
        assert!(
            text.contains(".target sm_90"),
            "{}: {}",
            k.name,
            &text[..400.min(text.len())]
        );
        for entry in k.entry_points {
            assert!(
                text.contains(&format!(".entry {entry}(")),
                "{}: no {entry}",
                k.name
            );
        }
    }
}

#[test]
fn a_syntax_error_names_the_kernel_and_the_line() {
    const BROKEN: KernelSource = KernelSource {
        name: "broken_on_purpose",
        source: "extern \"C\" __global__ void broken(float* x) {\n    x[0] = 1.0f\n}\n",
        entry_points: &["broken"],
    };
    let err = nvrtc::compile_kernel(&BROKEN, DEFAULT_ARCH).unwrap_err();
    let NvrtcError::Compile { first_error, .. } = &err else {
        panic!("expected a compile error, got {err:?}");
    };
    let msg = err.to_string();
    assert!(msg.contains("broken_on_purpose.cu"), "{msg}");
    assert!(msg.contains("sm_90"), "{msg}");
    // NVRTC reports the line the missing ';' is noticed at, in the file.
    assert!(
        first_error.contains("broken_on_purpose.cu(3)"),
        "{first_error}"
    );
    assert!(first_error.contains("error"), "{first_error}");
}

#[test]
fn an_error_in_a_real_kernel_reports_that_kernels_file_and_line() {
    // The common header is prepended, but `#line` keeps the .cu's numbering.
    let k = kernels::RMS_NORM;
    let broken = k.source.replace("rsqrtf(", "rsqrtf_missing(");
    let line = k
        .source
        .split("#line 1 \"rms_norm.cu\"\n")
        .nth(1)
        .unwrap()
        .lines()
        .position(|l| l.contains("rsqrtf("))
        .unwrap()
        + 1;
    let err = nvrtc::compile_source(k.name, &broken, DEFAULT_ARCH).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&format!("rms_norm.cu({line})")), "{msg}");
    assert!(msg.contains("rsqrtf_missing"), "{msg}");
}
