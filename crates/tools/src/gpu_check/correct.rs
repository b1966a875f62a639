//! Section (a) of gpu-check: each kernel, then whole batches, against the
//! CPU backend or an f64 reference, per table dtype, on fresh random inputs
//! (deleted rows, exclusions, empty histories and missing features
//! included). The CPU references run on the table as the device stores it
//! (rounded to the dtype), so the tolerances below measure the kernels, not
//! the dtype; the last rows measure the dtype against the f32 original.

use std::time::Instant;

use cudarc::driver::CudaSlice;

use super::inputs::*;
use super::{Report, Status};
use rankd::internals::cpu;
use rankd::internals::cuda::mlp::{DeviceMlp, ACT_NONE, ACT_SIGMOID};
use rankd::internals::cuda::ops::{Dev, TopkBufs};
use rankd::internals::cuda::plan::{PackedTopk, TopkPlan};
use rankd::internals::cuda::tables::{Buf, DeviceTable};
use rankd::internals::cuda::{ops, plan, CudaBackend, ItemDtype};
use rankd::internals::Rng;
use rankd::internals::{Backend, ModelId, Output, Query, Scored, TableId, Task};
use rankd::internals::{ItemTable, Weights, RANKER, TWO_TOWER};

const S: &str = "(a) kernels";

/// A fused top-k kernel, as gpu-check names it.
pub(super) struct KernelPath {
    pub tc: bool,
    /// Suffix of the check's name.
    pub label: &'static str,
}

/// The fused kernels that can serve `table` on this device, with the score
/// tolerance against the CPU on the same (rounded) table: tensor cores split
/// the f32 query into two bf16 terms (<= 2^-17 relative per term), CUDA
/// cores multiply in f32.
pub(super) fn kernel_paths(dev: &Dev<'_>, table: &DeviceTable) -> Vec<(KernelPath, f64)> {
    let cuda_cores = KernelPath {
        tc: false,
        label: "",
    };
    if dev.uses_tc(table) {
        let tensor = KernelPath {
            tc: true,
            label: " (tensor cores)",
        };
        let cuda = KernelPath {
            tc: false,
            label: " (CUDA cores)",
        };
        vec![(tensor, 1e-4), (cuda, 1e-5)]
    } else {
        vec![(cuda_cores, 1e-5)]
    }
}

/// The fused top-k over one table and one set of query vectors.
struct Fused<'a> {
    dev: &'a Dev<'a>,
    table: &'a DeviceTable,
    queries: &'a CudaSlice<f32>,
    ids: &'a [u64],
}

impl Fused<'_> {
    /// Runs `t` through every kernel that can serve the table and judges each
    /// against `want`: within the kernel's tolerance, or identical when
    /// `exact`. `inputs` describes the run for the report.
    // Each argument is one part of the row; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    fn judge(
        &self,
        report: &mut Report,
        bufs: &mut TopkBufs,
        t: &PackedTopk,
        want: &[Vec<Scored>],
        check: &str,
        exact: bool,
        inputs: &dyn Fn(&TopkPlan) -> String,
    ) -> anyhow::Result<()> {
        for (path, tol) in kernel_paths(self.dev, self.table) {
            let tol = if exact { 0.0 } else { tol };
            let dev = Dev {
                tc: path.tc,
                ..*self.dev
            };
            let p = ops::topk_launch(&dev, self.table, bufs, self.queries, D, t)?;
            let got = ops::topk_collect(&dev, bufs, &p, t, self.ids)?;
            judge_topk(
                report,
                &format!("{check}{}", path.label),
                inputs(&p),
                &compare_topk(&got, want, tol),
                tol,
                exact,
            );
        }
        Ok(())
    }
}

/// One row for a top-k comparison: `exact` demands identical lists (scores
/// exact by construction); otherwise ids may differ only where the scores are
/// within `tol` of each other (near-ties), and scores of equal ids by `tol`.
fn judge_topk(
    report: &mut Report,
    check: &str,
    inputs: String,
    a: &Agreement,
    tol: f64,
    exact: bool,
) {
    let equal = 100.0 * (a.positions - a.id_mismatch) as f64 / a.positions.max(1) as f64;
    let measured = format!(
        "ids equal {equal:.2}%, {} beyond ties, {} length diffs, score err {}",
        a.beyond_tie,
        a.len_mismatch,
        super::sci(a.max_err)
    );
    let ok = if exact {
        a.id_mismatch == 0 && a.len_mismatch == 0 && a.max_err == 0.0
    } else {
        a.beyond_tie == 0 && a.len_mismatch == 0 && a.max_err <= tol
    };
    let target = if exact {
        "identical".to_string()
    } else {
        format!("order within ties, err <= {}", super::sci(tol))
    };
    report.add(
        S,
        check,
        inputs,
        measured,
        target,
        if ok { Status::Pass } else { Status::Fail },
    );
}

pub(super) fn run(
    report: &mut Report,
    backend: Option<&mut CudaBackend>,
    seed: u64,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let inp = inputs(seed);
    report.notes.push(format!(
        "(a) inputs: {N} items × d={D} (2% deleted), {B} queries per batch, k in 0..1000, built in {} ms",
        t.elapsed().as_millis()
    ));
    match backend {
        Some(b) => {
            for dtype in ItemDtype::ALL {
                gpu_checks(report, b, &inp, dtype)?;
            }
        }
        None => host_only(report, &inp)?,
    }
    Ok(())
}

/// Without a GPU: every CPU reference is computed (so the host code runs),
/// and the device comparisons are listed as skipped.
fn host_only(report: &mut Report, inp: &Inputs) -> anyhow::Result<()> {
    let mut cpu = cpu_backend(inp)?;
    for dtype in ItemDtype::ALL {
        let t = Instant::now();
        let items_q = quantized(&inp.items, dtype);
        cpu.run(CPU_TWO_TOWER, &items_q, &queries(&inp.tt_queries))?;
        cpu.run(CPU_RANKER, &items_q, &queries(&inp.rk_queries))?;
        let ms = t.elapsed().as_millis();
        for check in [
            "embedding bag",
            "tower MLP",
            "fused top-k",
            "fused top-k, exact ties",
            "score rows",
            "scatter + growth",
            "two-tower batch",
            "ranker batch",
        ] {
            report.skip(
                S,
                check,
                format!("{}: CPU reference built ({ms} ms)", dtype.name()),
            );
        }
    }
    let t = Instant::now();
    let _ = tie_reference(inp);
    let x: Vec<f32> = (0..B * (D + FD)).map(|i| (i % 17) as f32 * 0.1).collect();
    let _ = mlp_f64(&inp.two_tower, &x, B, false);
    report.notes.push(format!(
        "(a) tie and f64 tower references built in {} ms",
        t.elapsed().as_millis()
    ));
    Ok(())
}

fn gpu_checks(
    report: &mut Report,
    b: &mut CudaBackend,
    inp: &Inputs,
    dtype: ItemDtype,
) -> anyhow::Result<()> {
    let name = dtype.name();
    // Ids of this dtype's tables and models on the device.
    let base = 10 * dtype.index();
    let [t_items, t_ties, t_scatter] = [0, 1, 2].map(|i| TableId::new(base + i));
    let models = (ModelId::new(base), ModelId::new(base + 1));
    b.load_table(t_items, &inp.items, dtype)?;
    b.load_table(t_ties, &inp.ties, dtype)?;
    b.load(
        models.0,
        desc(TWO_TOWER),
        t_items,
        &Weights::new(inp.two_tower.clone()),
    )?;
    b.load(
        models.1,
        desc(RANKER),
        t_items,
        &Weights::new(inp.ranker.clone()),
    )?;
    let items_q = quantized(&inp.items, dtype);
    let tt = queries(&inp.tt_queries);

    // Embedding bag, then the tower on its output, then the fused top-k and
    // pair scores on the tower's output: each kernel fed the same inputs as
    // its reference.
    let (dev, scratch, tables) = b.parts();
    let table = &tables[&t_items];
    let packed = plan::pack_users(&tt, FD);
    ops::embedding_bag(&dev, table, &mut scratch.users, &packed, FD)?;
    let xu = ops::download(dev.stream, scratch.users.xu.get(), B * (D + FD))?;
    let mut want = Vec::with_capacity(B * (D + FD));
    let mut h = vec![0f32; D];
    for q in &tt {
        cpu::history_mean(&items_q, q.history, &mut h);
        want.extend(h.iter().map(|&v| f64::from(v)));
        match q.features {
            Some(f) => want.extend(f.iter().map(|&v| f64::from(v))),
            None => want.extend(std::iter::repeat_n(0.0, FD)),
        }
    }
    report.bound(
        S,
        "embedding bag",
        format!("{name}: B={B}, history 0..50"),
        rel_err(&xu, &want),
        1e-6,
    );

    let mlp = DeviceMlp::upload(dev.stream, &inp.two_tower)?;
    let x = dev
        .stream
        .clone_htod(&xu)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut act: [Buf<f32>; 2] = Default::default();
    let w = mlp.forward(
        dev.stream,
        dev.blas,
        &dev.k.bias_act,
        &x,
        B,
        &mut act,
        ACT_NONE,
    )?;
    let qv = ops::download(dev.stream, act[w].get(), B * D)?;
    let want = mlp_f64(&inp.two_tower, &xu, B, false);
    report.bound(
        S,
        "tower MLP",
        format!("{name}: {}→96→{D}, B={B}", D + FD),
        rel_err(&qv, &want),
        1e-5,
    );
    let rk_mlp = DeviceMlp::upload(dev.stream, &inp.ranker)?;
    let mut rng = Rng::new(D as u64);
    let rx: Vec<f32> = (0..200 * (3 * D + FD)).map(|_| uniform(&mut rng)).collect();
    let x = dev
        .stream
        .clone_htod(&rx)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let w = rk_mlp.forward(
        dev.stream,
        dev.blas,
        &dev.k.bias_act,
        &x,
        200,
        &mut act,
        ACT_SIGMOID,
    )?;
    let got = ops::download(dev.stream, act[w].get(), 200)?;
    report.bound(
        S,
        "ranker MLP + sigmoid",
        format!("{name}: {}→48→1, 200 rows", 3 * D + FD),
        rel_err(&got, &mlp_f64(&inp.ranker, &rx, 200, true)),
        1e-5,
    );

    let qdev = dev
        .stream
        .clone_htod(&qv)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = plan::pack_topk(&tt);
    let qs: Vec<f32> = t
        .qsel
        .iter()
        .flat_map(|&i| qv[i as usize * D..(i as usize + 1) * D].to_vec())
        .collect();
    let specs: Vec<(usize, &[u32])> = tt
        .iter()
        .filter_map(|q| match q.task {
            Task::TopK { k, exclude, .. } => Some((k, exclude)),
            Task::Score { .. } => None,
        })
        .collect();
    let want = cpu::score_topk(&items_q, &qs, &specs);
    let fused = Fused {
        dev: &dev,
        table,
        queries: &qdev,
        ids: inp.items.ids(),
    };
    fused.judge(
        report,
        &mut scratch.topk,
        &t,
        &want,
        "fused top-k",
        false,
        &|p| {
            format!(
                "{name}: N={N}, {} queries, {} groups × {} chunks",
                t.qsel.len(),
                p.groups,
                p.chunks
            )
        },
    )?;
    // A wide batch of small k: up to 32 queries share a block, so every
    // query tile of the tensor-core kernel (and a partial last one) is used.
    let wide = PackedTopk {
        qsel: (0..29).collect(),
        ks: (0..29u32).map(|q| 1 + (q * 7) % 64).collect(),
        excl_off: vec![0; 30],
        filt_off: vec![0; 30],
        kmax: 64,
        ..Default::default()
    };
    let wide_specs: Vec<(usize, &[u32])> = wide.ks.iter().map(|&k| (k as usize, &[][..])).collect();
    let want = cpu::score_topk(&items_q, &qv[..29 * D], &wide_specs);
    let check = "fused top-k, wide batch";
    fused.judge(
        report,
        &mut scratch.topk,
        &wide,
        &want,
        check,
        false,
        &|p| {
            format!(
                "{name}: N={N}, 29 queries, k 1..64, {} groups × {} chunks",
                p.groups, p.chunks
            )
        },
    )?;

    let pairs = plan::pack_pairs(&tt);
    let got = ops::score_pairs(&dev, table, &mut scratch.pairs, &qdev, &pairs)?;
    let want: Vec<f64> = pairs
        .pair_q
        .iter()
        .zip(&pairs.pair_row)
        .map(|(&q, &r)| {
            let qq = &qv[q as usize * D..(q as usize + 1) * D];
            qq.iter()
                .zip(items_q.embedding(r))
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum()
        })
        .collect();
    report.bound(
        S,
        "score rows",
        format!("{name}: {} pairs", want.len()),
        rel_err(&got, &want),
        1e-5,
    );

    let tie_table = &tables[&t_ties];
    let tq = dev
        .stream
        .clone_htod(&inp.tie_q)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let tie_queries: Vec<Query<'_>> = inp
        .tie_specs
        .iter()
        .map(|(k, ex)| Query {
            history: &[],
            features: None,
            sparse: None,
            context: None,
            task: Task::TopK {
                k: *k,
                exclude: ex,
                filter: None,
            },
        })
        .collect();
    let t = plan::pack_topk(&tie_queries);
    let ties = Fused {
        dev: &dev,
        table: tie_table,
        queries: &tq,
        ids: inp.ties.ids(),
    };
    let want = tie_reference(inp);
    ties.judge(
        report,
        &mut scratch.topk,
        &t,
        &want,
        "fused top-k, exact ties",
        true,
        &|_| format!("{name}: N={}, scores in 0.5 steps, k 1..1000", N / 3),
    )?;

    scatter_check(report, b, inp, dtype, t_scatter)?;
    batch_checks(report, b, inp, dtype, models, &items_q)?;
    Ok(())
}

/// Upserts, deletes and enough new rows to outgrow the device capacity, then
/// the mirror read back must equal the host table rounded to the dtype, and
/// a top-k over it must equal the CPU's.
fn scatter_check(
    report: &mut Report,
    b: &mut CudaBackend,
    inp: &Inputs,
    dtype: ItemDtype,
    id: TableId,
) -> anyhow::Result<()> {
    let mut rng = Rng::new(inp.items.rows() as u64 ^ dtype.index() as u64);
    let mut host = inp.items.clone();
    b.load_table(id, &host, dtype)?;
    let cap_before = b.table(id).map_or(0, |t| t.cap);
    let mut changed = Vec::new();
    let emb = |rng: &mut Rng| -> Vec<f32> { (0..D).map(|_| uniform(rng)).collect() };
    for _ in 0..2000 {
        let r = rng.below(N as u64) as u32;
        let e = emb(&mut rng);
        if let rankd::internals::ItemChange::Applied { row } = host.upsert(host.id(r), &e, 2) {
            changed.push(row);
        }
    }
    for _ in 0..500 {
        let r = rng.below(N as u64) as u32;
        if let rankd::internals::ItemChange::Applied { row } = host.delete(host.id(r), 3) {
            changed.push(row);
        }
    }
    let added = cap_before - N + 1500;
    for j in 0..added {
        let e = emb(&mut rng);
        if let rankd::internals::ItemChange::Applied { row } = host.upsert(item_id(N + j), &e, 1) {
            changed.push(row);
        }
    }
    b.items_changed(id, &host, &changed)?;
    let (dev, scratch, tables) = b.parts();
    let table = &tables[&id];
    let (ids, live, embs) = table.download(dev.stream)?;
    let host_q = quantized(&host, dtype);
    let mut bad = usize::from(ids.len() != host.rows());
    bad += ids.iter().zip(host.ids()).filter(|(a, b)| a != b).count();
    bad += live
        .iter()
        .zip(host.live_mask())
        .filter(|(a, b)| (**a != 0) != **b)
        .count();
    bad += embs
        .iter()
        .zip(host_q.embeddings())
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let inputs = format!(
        "{}: 2000 upserts, 500 deletes, {added} new rows (cap {cap_before} → {})",
        dtype.name(),
        table.cap
    );
    let grew = table.cap > cap_before;
    report.add(
        S,
        "scatter + growth",
        inputs,
        format!("{bad} differing values"),
        "0, table grown",
        if bad == 0 && grew {
            Status::Pass
        } else {
            Status::Fail
        },
    );

    let qs: Vec<f32> = (0..8 * D).map(|_| uniform(&mut rng)).collect();
    let qdev = dev
        .stream
        .clone_htod(&qs)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let qspecs: Vec<Query<'_>> = (0..8)
        .map(|i| Query {
            history: &[],
            features: None,
            sparse: None,
            context: None,
            task: Task::TopK {
                k: [10, 1000][i % 2],
                exclude: &[],
                filter: None,
            },
        })
        .collect();
    let t = plan::pack_topk(&qspecs);
    let p = ops::topk_launch(&dev, table, &mut scratch.topk, &qdev, D, &t)?;
    let got = ops::topk_collect(&dev, &mut scratch.topk, &p, &t, host.ids())?;
    let specs: Vec<(usize, &[u32])> = t.ks.iter().map(|&k| (k as usize, &[][..])).collect();
    let want = cpu::score_topk(&host_q, &qs, &specs);
    judge_topk(
        report,
        "fused top-k after scatter",
        format!("{}: {} rows", dtype.name(), host.rows()),
        &compare_topk(&got, &want, 1e-5),
        1e-5,
        false,
    );
    Ok(())
}

/// Whole batches of the device's two-tower and ranker models through
/// `Backend::run` against the CPU backend: on the rounded table (the
/// kernels' agreement), and for 16-bit dtypes on the f32 original (what the
/// dtype costs, against the documented tolerance).
fn batch_checks(
    report: &mut Report,
    b: &mut CudaBackend,
    inp: &Inputs,
    dtype: ItemDtype,
    (tt_model, rk_model): (ModelId, ModelId),
    items_q: &ItemTable,
) -> anyhow::Result<()> {
    let name = dtype.name();
    let mut cpu = cpu_backend(inp)?;
    let tt = queries(&inp.tt_queries);
    let rk = queries(&inp.rk_queries);
    let got_tt = b.run(tt_model, &inp.items, &tt)?;
    let got_rk = b.run(rk_model, &inp.items, &rk)?;
    let want_tt = cpu.run(CPU_TWO_TOWER, items_q, &tt)?;
    let want_rk = cpu.run(CPU_RANKER, items_q, &rk)?;
    let (lists_g, scores_g) = split(&got_tt);
    let (lists_c, scores_c) = split(&want_tt);
    judge_topk(
        report,
        "two-tower batch: top-k",
        format!("{name}: B={B} via Backend::run"),
        &compare_topk(&lists_g, &lists_c, 1e-4),
        1e-4,
        false,
    );
    let want: Vec<f64> = scores_c.iter().map(|&v| f64::from(v)).collect();
    report.bound(
        S,
        "two-tower batch: scores",
        format!("{name}: {} candidates", want.len()),
        rel_err(&scores_g, &want),
        1e-4,
    );
    let (_, g) = split(&got_rk);
    let (_, c) = split(&want_rk);
    let want: Vec<f64> = c.iter().map(|&v| f64::from(v)).collect();
    report.bound(
        S,
        "ranker batch",
        format!("{name}: {} candidates", want.len()),
        rel_err(&g, &want),
        1e-4,
    );
    if dtype != ItemDtype::F32 {
        let orig = cpu.run(CPU_TWO_TOWER, &inp.items, &tt)?;
        let (_, c) = split(&orig);
        let want: Vec<f64> = c.iter().map(|&v| f64::from(v)).collect();
        let tol = if dtype == ItemDtype::F16 { 1e-3 } else { 1e-2 };
        report.bound(
            S,
            "dtype vs f32 table: scores",
            format!("{name} table vs CPU on f32"),
            rel_err(&scores_g, &want),
            tol,
        );
    }
    Ok(())
}

/// Top-k lists and all scores of a batch's outputs, in order.
fn split(out: &[Output]) -> (Vec<Vec<Scored>>, Vec<f32>) {
    let mut lists = Vec::new();
    let mut scores = Vec::new();
    for o in out {
        match o {
            Output::TopK(l) => lists.push(l.clone()),
            Output::Scores(s) => scores.extend_from_slice(s),
        }
    }
    (lists, scores)
}
