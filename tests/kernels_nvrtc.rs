//! The GPU code on a host without a GPU.
//!
//! Every kernel in kernels/ compiles with NVRTC for Hopper (sm_90) and
//! Ampere (sm_80) and defines the entry points rankd loads. Runs without a
//! GPU; NVRTC itself must be loadable (scripts/test.sh points
//! RANKD_NVRTC_LIB and LD_LIBRARY_PATH at a pip-installed NVRTC 13), and
//! the tests fail, not skip, when it is not.
//!
//! `rankd gpu-check --dry-run`: every host-side part runs (inputs, CPU
//! references, NVRTC compiles, the table) and each device part is listed as
//! skipped rather than passed.
#![cfg(feature = "cuda")]

use rankd::internals::cuda::kernels::{self, SOURCES};
use rankd_tools::gpu_check::{run_check, CheckOptions};

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

#[test]
fn dry_run_builds_the_references_and_lists_the_skipped_device_parts() {
    let table = run_check(CheckOptions {
        dry_run: true,
        bench_rows: 100_000,
        seed: Some(7),
        ..Default::default()
    })
    .expect("a dry run passes on any host");
    assert!(table.contains("seed 7"), "{table}");
    assert!(table.contains("dry run"), "{table}");
    for row in [
        "embedding bag",
        "fused top-k, exact ties",
        "scatter + growth",
        "device-to-device copy",
        "fused score+top-k, batch 32",
    ] {
        let line = table
            .lines()
            .find(|l| l.contains(&format!("| {row}")))
            .unwrap_or_else(|| panic!("no `{row}` row:\n{table}"));
        assert!(
            line.contains("skipped"),
            "device part not marked skipped: {line}"
        );
    }
    // NVRTC is there under scripts/test.sh; the compile rows then pass.
    if rankd::internals::cuda::kernels::nvrtc_version().is_ok() {
        let compiles: Vec<&str> = table.lines().filter(|l| l.contains("| compile ")).collect();
        assert_eq!(
            compiles.len(),
            SOURCES.len(),
            "one compile row per kernel file\n{table}"
        );
        let result = |l: &str| {
            l.trim_end_matches('|')
                .rsplit('|')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        };
        assert!(compiles.iter().all(|l| result(l) == "ok"), "{table}");
    }
    assert!(table.trim_end().ends_with("all checks passed"), "{table}");
}
