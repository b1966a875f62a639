//! Tower MLPs on the device: one cuBLAS SGEMM per layer (f32, no TF32, so
//! results stay within f32 rounding of the CPU's) followed by the bias_act
//! kernel (bias, then ReLU between layers; none or sigmoid after the last).

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::error::{Ctx, GpuError};
use super::tables::Buf;
use crate::model::TowerWeights;

pub const ACT_NONE: u32 = 0;
pub const ACT_RELU: u32 = 1;
pub const ACT_SIGMOID: u32 = 2;

struct Layer {
    w: CudaSlice<f32>,
    b: CudaSlice<f32>,
    in_dim: usize,
    out_dim: usize,
}

pub struct DeviceMlp {
    layers: Vec<Layer>,
}

impl DeviceMlp {
    pub fn upload(stream: &Arc<CudaStream>, weights: &TowerWeights) -> Result<Self, GpuError> {
        let layers = weights
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    w: stream
                        .clone_htod(&l.weight)
                        .ctx("uploading tower weights")?,
                    b: stream.clone_htod(&l.bias).ctx("uploading tower weights")?,
                    in_dim: l.in_dim,
                    out_dim: l.out_dim,
                })
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        Ok(Self { layers })
    }

    pub fn in_dim(&self) -> usize {
        self.layers.first().map_or(0, |l| l.in_dim)
    }

    pub fn out_dim(&self) -> usize {
        self.layers.last().map_or(0, |l| l.out_dim)
    }

    /// The widest layer output: what each activation buffer holds per row.
    pub fn max_width(&self) -> usize {
        self.layers.iter().map(|l| l.out_dim).max().unwrap_or(0)
    }

    /// Runs `x` ([rows, in_dim]) through every layer; returns which of `bufs`
    /// holds the output ([rows, out_dim]). `last` is the final activation.
    // Every argument is a distinct device part; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        stream: &Arc<CudaStream>,
        blas: &CudaBlas,
        bias_act: &CudaFunction,
        x: &CudaSlice<f32>,
        rows: usize,
        bufs: &mut [Buf<f32>; 2],
        last: u32,
    ) -> Result<usize, GpuError> {
        if self.layers.is_empty() {
            return Err(GpuError::Invalid(
                "a tower without layers: this is a bug".into(),
            ));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let out = i % 2;
            bufs[out].reserve(stream, rows * layer.out_dim)?;
            let (a, b) = bufs.split_at_mut(1);
            let (input, output): (&CudaSlice<f32>, &mut CudaSlice<f32>) = if out == 0 {
                (if i == 0 { x } else { b[0].get() }, a[0].get_mut())
            } else {
                (a[0].get(), b[0].get_mut())
            };
            linear_gemm(
                blas,
                &layer.w,
                input,
                output,
                rows,
                layer.in_dim,
                layer.out_dim,
            )?;
            let mode = if i + 1 < self.layers.len() {
                ACT_RELU
            } else {
                last
            };
            launch_bias_act(
                stream,
                bias_act,
                output,
                rows,
                layer.out_dim,
                &layer.b,
                mode,
            )?;
        }
        Ok((self.layers.len() - 1) % 2)
    }
}

/// Y[rows, out] = X[rows, in] · W[out, in]ᵀ, all row-major, in f32 on
/// cuBLAS. `w` must hold out·in floats, `x` at least rows·in, `y` rows·out.
pub fn linear_gemm(
    blas: &CudaBlas,
    w: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
) -> Result<(), GpuError> {
    if w.len() < out_dim * in_dim || x.len() < rows * in_dim || y.len() < rows * out_dim {
        return Err(GpuError::Invalid(format!(
            "a {rows} × {in_dim} → {out_dim} product over buffers of {}, {} and {} floats: this is a bug",
            w.len(),
            x.len(),
            y.len()
        )));
    }
    // Row-major Y[rows, out] = X[rows, in] · W[out, in]ᵀ is, in cuBLAS's
    // column-major terms, Yᶜ[out, rows] = Wᶜ[in, out]ᵀ · Xᶜ[in, rows].
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: out_dim as i32,
        n: rows as i32,
        k: in_dim as i32,
        alpha: 1.0f32,
        lda: in_dim as i32,
        ldb: in_dim as i32,
        beta: 0.0f32,
        ldc: out_dim as i32,
    };
    // SAFETY: the sizes were checked above.
    unsafe { blas.gemm(cfg, w, x, y) }.ctx("tower GEMM")?;
    Ok(())
}

pub fn launch_bias_act(
    stream: &Arc<CudaStream>,
    f: &CudaFunction,
    y: &mut CudaSlice<f32>,
    rows: usize,
    cols: usize,
    bias: &CudaSlice<f32>,
    mode: u32,
) -> Result<(), GpuError> {
    let n = rows * cols;
    if n == 0 {
        return Ok(());
    }
    let (rows32, cols32) = (rows as u32, cols as u32);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).min(4096) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches bias_act in bias_act.cu; y holds rows·cols floats and
    // bias cols.
    unsafe {
        stream
            .launch_builder(f)
            .arg(y)
            .arg(&rows32)
            .arg(&cols32)
            .arg(bias)
            .arg(&mode)
            .launch(cfg)
    }
    .ctx("bias_act launch")?;
    Ok(())
}
