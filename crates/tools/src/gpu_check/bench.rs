//! Sections (b) and (c) of gpu-check. (b): the device's copy bandwidth (a
//! device-to-device copy of the benchmark table, bytes read + written), and
//! the fused score + top-k over a 10M × 128 bf16 table at batch 1, 8 and 32
//! as table bytes read per second against it (target >= 50%). (c): the fused
//! kernel against cuBLAS GEMM (bf16 in, f32 scores out) plus a separate
//! top-k over the score matrix, at batch 64. Times are medians of CUDA-event
//! timed repeats after warm-up; the table (GBs) is far larger than L2.

use std::sync::Arc;

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::{CheckOptions, Report, Status};
use rankd::internals::cpu;
use rankd::internals::cuda::error::{Ctx, GpuError};
use rankd::internals::cuda::ops::Dev;
use rankd::internals::cuda::plan::{self, padded_dim, PackedTopk};
use rankd::internals::cuda::tables::{decode_rows, DeviceTable, ItemDtype};
use rankd::internals::cuda::{ops, CudaBackend};
use rankd::internals::ItemTable;
use rankd::internals::Rng;
use rankd::internals::{Query, Scored, Task};

const SB: &str = "(b) bandwidth";
const SC: &str = "(c) fused vs GEMM";
const K: usize = 100;

/// Median milliseconds of `reps` event-timed calls after `warmup` calls.
fn time_ms(
    stream: &Arc<CudaStream>,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<(), GpuError>,
) -> anyhow::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    stream.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        f()?;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        times.push(f64::from(start.elapsed_ms(&end)?));
    }
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}

fn topk_tasks(batch: usize, k: usize) -> PackedTopk {
    let q: Vec<Query<'_>> = (0..batch)
        .map(|_| Query {
            history: &[],
            features: None,
            sparse: None,
            context: None,
            task: Task::TopK {
                k,
                exclude: &[],
                filter: None,
            },
        })
        .collect();
    plan::pack_topk(&q)
}

fn random_queries(rng: &mut Rng, batch: usize, d: usize) -> Vec<f32> {
    (0..batch * d)
        .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
        .collect()
}

/// Every list full, best first, rows in range.
fn well_formed(lists: &[Vec<Scored>], k: usize, rows: usize) -> bool {
    lists.iter().all(|l| {
        l.len() == k.min(rows)
            && l.windows(2).all(|w| w[0].score >= w[1].score)
            && l.iter().all(|s| (s.id as usize) < rows)
    })
}

pub(super) fn run(
    report: &mut Report,
    backend: Option<&mut CudaBackend>,
    opts: &CheckOptions,
    seed: u64,
) -> anyhow::Result<()> {
    let (rows, d) = (opts.bench_rows, opts.bench_dim);
    let gb = (rows * padded_dim(d) * 2) as f64 / 1e9;
    let table_desc = format!("{rows} × {d} bf16 ({gb:.2} GB)");
    let Some(b) = backend else {
        let mut rng = Rng::new(seed);
        let _ = random_queries(&mut rng, 64, d);
        report.skip(
            SB,
            "device-to-device copy",
            format!("the table, {gb:.2} GB"),
        );
        for batch in [1, 8, 32] {
            report.skip(
                SB,
                format!("fused score+top-k, batch {batch}, k={K}"),
                table_desc.clone(),
            );
        }
        report.skip(
            SC,
            format!("fused vs GEMM + top-k, batch 64, k={K}"),
            table_desc,
        );
        return Ok(());
    };
    let (dev, scratch, _) = b.parts();
    let s = dev.stream;
    let table = DeviceTable::synthetic(s, dev.k, rows, d, ItemDtype::Bf16, seed)?;
    let bytes = table.embedding_bytes();

    let copy_bw = {
        let mut dst = s
            .alloc_zeros::<u8>(bytes)
            .ctx("allocating the copy target")?;
        let src = table.emb.slice(..bytes);
        let ms = time_ms(s, 2, 10, || {
            s.memcpy_dtod(&src, &mut dst).ctx("device copy")
        })?;
        let bw = 2.0 * bytes as f64 / (ms / 1e3);
        report.add(
            SB,
            "device-to-device copy",
            format!("the table, {gb:.2} GB"),
            format!("{ms:.3} ms, {:.0} GB/s read+write", bw / 1e9),
            "roof for (b)",
            Status::Info,
        );
        bw
    };

    let ids: Vec<u64> = (0..rows as u64).collect();
    let mut rng = Rng::new(seed ^ 0x5eed);
    // The kernel that serves bf16 tables (tensor cores where the device and
    // the start-up check allow), then the CUDA-core kernel at batch 32 for
    // comparison; only the serving kernel's k = 100 rows are judged.
    let serving = dev.uses_tc(&table);
    let mut runs = vec![
        (1, K, serving),
        (8, K, serving),
        (32, K, serving),
        (8, 1000, serving),
    ];
    if serving {
        runs.push((32, K, false));
    }
    for (batch, k, tc) in runs {
        let dev = Dev { tc, ..dev };
        let judged = k == K && tc == serving;
        let label = match (serving, tc) {
            (false, _) => "",
            (true, true) => ", tensor cores",
            (true, false) => ", CUDA cores",
        };
        let q = random_queries(&mut rng, batch, d);
        let qdev = s.clone_htod(&q).ctx("uploading queries")?;
        let t = topk_tasks(batch, k);
        let mut shape = None;
        let ms = time_ms(s, 2, 10, || {
            shape = Some(ops::topk_launch(
                &dev,
                &table,
                &mut scratch.topk,
                &qdev,
                d,
                &t,
            )?);
            Ok(())
        })?;
        let p = shape.expect("launched at least once");
        let lists = ops::topk_collect(&dev, &mut scratch.topk, &p, &t, &ids)?;
        let read = bytes as f64 / (ms / 1e3);
        let share = read / copy_bw;
        let ok = well_formed(&lists, k, rows) && (!judged || share >= 0.5);
        report.add(
            SB,
            format!("fused score+top-k, batch {batch}, k={k}{label}"),
            format!("{table_desc}, {} groups × {} chunks", p.groups, p.chunks),
            format!(
                "{ms:.3} ms, {:.0} GB/s = {:.0}% of copy",
                read / 1e9,
                share * 100.0
            ),
            if judged { ">= 50% of copy" } else { "info" },
            match (ok, judged) {
                (false, _) => Status::Fail,
                (true, true) => Status::Pass,
                (true, false) => Status::Info,
            },
        );
        if batch == 1 {
            // One pass at full size against the CPU: the kernel's answer at
            // 10M rows and hundreds of chunks, not only at check sizes.
            let host = host_copy(s, &table)?;
            let want = cpu::score_topk(&host, &q, &[(k, &[][..])]);
            let same = lists == want || near_equal(&lists[0], &want[0]);
            report.add(
                SB,
                "fused top-k = CPU at full size",
                format!("{table_desc}, batch 1, k={k}"),
                if same { "equal" } else { "DIFFERENT" },
                "equal within ties",
                if same { Status::Pass } else { Status::Fail },
            );
        }
    }

    // (c) batch 64: fused against GEMM to a score matrix, then top-k.
    let batch = 64;
    let q = random_queries(&mut rng, batch, d);
    let qdev = s.clone_htod(&q).ctx("uploading queries")?;
    let t = topk_tasks(batch, K);
    let fused = time_ms(s, 2, 10, || {
        ops::topk_launch(&dev, &table, &mut scratch.topk, &qdev, d, &t).map(|_| ())
    })?;
    let ld = table.ld;
    let mut qb = Vec::with_capacity(batch * ld);
    for row in q.chunks(d) {
        qb.extend(
            (0..ld).map(|c| half::bf16::from_f32(if c < d { row[c] } else { 0.0 }).to_bits()),
        );
    }
    let qb = s.clone_htod(&qb).ctx("uploading bf16 queries")?;
    let mut scores = s
        .alloc_zeros::<f32>(batch * rows)
        .ctx("allocating the score matrix")?;
    let gemm = || -> Result<(), GpuError> {
        let (a, _ra) = table.emb.device_ptr(s);
        let (bq, _rb) = qb.device_ptr(s);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (c, _rc) = scores.device_ptr_mut(s);
        // SAFETY: column-major C[rows, 64] = Aᵀ·B with A the table ([ld, rows]
        // column-major, bf16), B the queries ([ld, 64], bf16), C f32 with
        // ldc = rows; every pointer addresses a buffer of that size.
        unsafe {
            gemm_ex(
                *dev.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                rows as i32,
                batch as i32,
                d as i32,
                (&alpha as *const f32).cast(),
                a as *const std::ffi::c_void,
                cudaDataType::CUDA_R_16BF,
                ld as i32,
                bq as *const std::ffi::c_void,
                cudaDataType::CUDA_R_16BF,
                ld as i32,
                (&beta as *const f32).cast(),
                c as *mut std::ffi::c_void,
                cudaDataType::CUDA_R_32F,
                rows as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .ctx("cublasGemmEx")
    };
    let gemm_ms = time_ms(s, 2, 10, gemm)?;
    // The score matrix now holds this batch's scores for the select timing.
    let select_ms = time_ms(s, 2, 10, || {
        ops::dense_topk_launch(&dev, &table.ids, &mut scratch.topk, &scores, rows, &t).map(|_| ())
    })?;
    let total = gemm_ms + select_ms;
    let inputs = format!("{table_desc}, batch {batch}, k={K}");
    report.add(
        SC,
        "fused score+top-k",
        inputs.clone(),
        format!("{fused:.3} ms"),
        "-",
        Status::Info,
    );
    report.add(
        SC,
        "cuBLAS GEMM (bf16→f32 scores)",
        inputs.clone(),
        format!(
            "{gemm_ms:.3} ms, {:.1} GB score matrix",
            (batch * rows * 4) as f64 / 1e9
        ),
        "-",
        Status::Info,
    );
    report.add(
        SC,
        "top-k over the score matrix",
        inputs.clone(),
        format!("{select_ms:.3} ms"),
        "-",
        Status::Info,
    );
    report.add(
        SC,
        "GEMM + top-k vs fused",
        inputs,
        format!(
            "{total:.3} ms vs {fused:.3} ms: fused is {:.2}× faster",
            total / fused
        ),
        "info",
        Status::Info,
    );
    Ok(())
}

/// The device table back on the host as an `ItemTable` (ids = rows).
fn host_copy(s: &Arc<CudaStream>, table: &DeviceTable) -> anyhow::Result<ItemTable> {
    let bytes = s.clone_dtoh(&table.emb.slice(..table.embedding_bytes()))?;
    s.synchronize()?;
    let emb = decode_rows(table.dtype, &bytes, table.dim, table.ld);
    ItemTable::new(table.dim, (0..table.rows as u64).collect(), emb).map_err(anyhow::Error::msg)
}

/// Equal up to neighbours with scores within 1e-5 relative swapping places.
/// Same ids, or scores within 1e-4 of the list's scale where they differ (a
/// near tie ordered differently: the tensor-core kernel's scores are within
/// ~1e-5 relative of f32, the CUDA-core kernel's closer).
fn near_equal(a: &[Scored], b: &[Scored]) -> bool {
    let scale = b.iter().fold(0f32, |m, s| m.max(s.score.abs())).max(1e-30);
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.id == y.id || (x.score - y.score).abs() <= 1e-4 * scale)
}
