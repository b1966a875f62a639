//! `rankd gpu-check --dry-run` on a host without a GPU: every host-side part
//! runs (inputs, CPU references, NVRTC compiles, the table) and each device
//! part is listed as skipped rather than passed.
#![cfg(feature = "cuda")]

use rankd_tools::gpu_check::{run_check, CheckOptions};

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
        assert_eq!(compiles.len(), 4, "{table}");
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
