//! Every kernel in kernels/ compiles with NVRTC for Hopper (sm_90) and
//! Ampere (sm_80) and defines the entry points rankd loads. Runs without a
//! GPU; NVRTC itself must be loadable (scripts/test.sh points
//! RANKD_NVRTC_LIB and LD_LIBRARY_PATH at a pip-installed NVRTC 13), and
//! the test fails, not skips, when it is not.
#![cfg(feature = "cuda")]

use rankd::internals::cuda::kernels::{self, SOURCES};

fn nvrtc() -> (i32, i32) {
    kernels::nvrtc_version().unwrap_or_else(|why| {
        panic!(
            "NVRTC cannot be loaded, so the CUDA kernels cannot be checked: {why}. \
             Install it (pip install nvidia-cuda-nvrtc==13.0.88) and set RANKD_NVRTC_LIB \
             and LD_LIBRARY_PATH to its nvidia/cu13/lib folder, as scripts/test.sh does."
        )
    })
}

#[test]
fn every_kernel_compiles_for_sm90_and_sm80() {
    let version = nvrtc();
    assert!(
        version.0 >= 12,
        "NVRTC {version:?} is older than the CUDA 12 rankd targets"
    );
    for arch in ["sm_90", "sm_80"] {
        for src in SOURCES {
            let compiled = kernels::compile(src, arch, true)
                .unwrap_or_else(|e| panic!("{} does not compile for {arch}:\n{e}", src.file));
            assert!(
                compiled.ptx.contains(&format!(".target {arch}")),
                "{} for {arch}: PTX targets something else",
                src.file
            );
            for entry in src.entries {
                assert!(
                    compiled.ptx.contains(&format!(".entry {entry}(")),
                    "{} for {arch}: no .entry {entry} in the PTX",
                    src.file
                );
            }
            // Spills would put the fused kernel's accumulators in local memory.
            assert!(
                !compiled.log.lines().any(|l| l.contains("bytes spill")
                    && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")),
                "{} for {arch} spills registers:\n{}",
                src.file,
                compiled.log
            );
        }
    }
}

#[test]
fn a_broken_kernel_reports_nvrtc_s_log() {
    nvrtc();
    let bad = kernels::KernelSource {
        file: "broken.cu",
        source: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
        entries: &["k"],
    };
    let err = kernels::compile(&bad, "sm_90", false)
        .err()
        .expect("does not compile")
        .to_string();
    assert!(err.contains("broken.cu"), "{err}");
    assert!(
        err.contains("undefined_name"),
        "the log names the error: {err}"
    );
}
