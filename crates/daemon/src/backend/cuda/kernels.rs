//! The CUDA C kernels (kernels/*.cu, embedded in the binary), compiled with
//! NVRTC at first use for the device's exact compute capability, and the
//! PTX cached on disk keyed by source, options, device, driver and NVRTC
//! version, so a restart loads in milliseconds. A cache that cannot be
//! written is only a warning.

use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::libs::{self, LibError};
use super::tables::ItemDtype;

/// Why the kernels could not be compiled or loaded.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Library(#[from] LibError),
    #[error("nvrtcVersion: {message}")]
    Version { message: String },
    #[error("{file}: NUL in source")]
    NulInSource { file: &'static str },
    #[error("{file}: {message}")]
    CreateProgram { file: &'static str, message: String },
    /// The source does not compile; `log` is NVRTC's.
    #[error("{file} for {arch}: {message}\n{log}")]
    Compile {
        file: &'static str,
        arch: String,
        message: String,
        log: String,
    },
    #[error("loading {file}: {message}")]
    Load { file: &'static str, message: String },
    #[error("kernel {name}: {message}")]
    Function { name: String, message: String },
    #[error("reading a kernel's shared memory: {message}")]
    SharedSize { message: String },
    #[error("opting in to {smem} bytes of shared memory: {message}")]
    SharedOptIn { smem: i32, message: String },
}

/// One .cu file and the kernels it must define.
pub struct KernelSource {
    pub file: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

const COMMON: &str = include_str!("../../../../../kernels/common.cuh");

pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        file: "embedding_bag.cu",
        source: include_str!("../../../../../kernels/embedding_bag.cu"),
        entries: &[
            "embedding_bag_f32",
            "embedding_bag_f16",
            "embedding_bag_bf16",
            "ranker_inputs_f32",
            "ranker_inputs_f16",
            "ranker_inputs_bf16",
        ],
    },
    KernelSource {
        file: "score_topk.cu",
        source: include_str!("../../../../../kernels/score_topk.cu"),
        entries: &[
            "score_topk_partial_f32",
            "score_topk_partial_f16",
            "score_topk_partial_bf16",
            "score_topk_partial_tc_bf16",
            "score_rows_f32",
            "score_rows_f16",
            "score_rows_bf16",
            "topk_merge",
            "topk_dense_partial",
        ],
    },
    KernelSource {
        file: "scatter.cu",
        source: include_str!("../../../../../kernels/scatter.cu"),
        entries: &[
            "scatter_rows_f32",
            "scatter_rows_f16",
            "scatter_rows_bf16",
            "fill_uniform_f32",
            "fill_uniform_f16",
            "fill_uniform_bf16",
            "fill_u8",
            "iota_u64",
            "scatter_attrs",
        ],
    },
    KernelSource {
        file: "bias_act.cu",
        source: include_str!("../../../../../kernels/bias_act.cu"),
        entries: &["bias_act"],
    },
    KernelSource {
        file: "sequence.cu",
        source: include_str!("../../../../../kernels/sequence.cu"),
        entries: &[
            "sasrec_inputs_f32",
            "sasrec_inputs_f16",
            "sasrec_inputs_bf16",
            "layer_norm",
            "attention",
            "add_f32",
            "copy_f32",
            "last_rows",
        ],
    },
];

impl KernelSource {
    /// What NVRTC compiles: the shared header, then the file (with a #line so
    /// diagnostics name the right file and line).
    pub fn full_source(&self) -> String {
        format!("{COMMON}\n#line 1 \"{}\"\n{}", self.file, self.source)
    }
}

/// NVRTC options for `arch` (`sm_90`); `verbose` adds ptxas's register and
/// spill report to the log.
pub fn compile_options(arch: &str, verbose: bool) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
    ];
    if verbose {
        o.push("--ptxas-options=-v".to_string());
    }
    o
}

pub struct Compiled {
    pub ptx: String,
    /// NVRTC's log (warnings; ptxas's report when verbose).
    pub log: String,
}

/// NVRTC's (major, minor) version, or why NVRTC cannot be used.
pub fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    libs::ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loadable (checked above); plain out-parameters.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| KernelError::Version {
            message: e.to_string(),
        })?;
    Ok((major, minor))
}

/// Compiles one source for `arch`. Errors carry NVRTC's log.
pub fn compile(src: &KernelSource, arch: &str, verbose: bool) -> Result<Compiled, KernelError> {
    use cudarc::nvrtc::result;
    libs::ensure_nvrtc()?;
    let code =
        CString::new(src.full_source()).map_err(|_| KernelError::NulInSource { file: src.file })?;
    let name = CString::new(src.file).expect("file names have no NUL");
    let prog =
        result::create_program(&code, Some(&name)).map_err(|e| KernelError::CreateProgram {
            file: src.file,
            message: e.to_string(),
        })?;
    let options = compile_options(arch, verbose);
    // SAFETY: `prog` is a live program; it is destroyed once below.
    let out = unsafe {
        let status = result::compile_program(prog, &options);
        let log = result::get_program_log(prog)
            .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
            .unwrap_or_default();
        let ptx = status
            .and_then(|_| result::get_ptx(prog))
            .map(|p| CStr::from_ptr(p.as_ptr()).to_string_lossy().into_owned());
        let _ = result::destroy_program(prog);
        match ptx {
            Ok(ptx) => Ok(Compiled { ptx, log }),
            Err(e) => Err(KernelError::Compile {
                file: src.file,
                arch: arch.to_string(),
                message: e.to_string(),
                log,
            }),
        }
    };
    out
}

/// `$XDG_CACHE_HOME/rankd/ptx`, else `~/.cache/rankd/ptx`.
pub fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("rankd").join("ptx"))
}

/// What a cached PTX depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey<'a> {
    pub device_name: &'a str,
    pub cc: (i32, i32),
    pub driver_version: i32,
    pub nvrtc: (i32, i32),
}

impl CacheKey<'_> {
    /// FNV-1a over everything the PTX depends on: stable across Rust versions
    /// (unlike `DefaultHasher`), which a file name on disk needs.
    pub fn hash(&self, source: &str, options: &[String]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes.iter().chain([0xffu8].iter()) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        eat(source.as_bytes());
        for o in options {
            eat(o.as_bytes());
        }
        eat(self.device_name.as_bytes());
        eat(format!("{:?} {} {:?}", self.cc, self.driver_version, self.nvrtc).as_bytes());
        h
    }

    pub fn file_name(&self, src: &KernelSource, hash: u64) -> String {
        let stem = src.file.trim_end_matches(".cu");
        format!("{stem}-sm_{}{}-{hash:016x}.ptx", self.cc.0, self.cc.1)
    }
}

/// The PTX of `src` for the device: from the cache, else compiled (and
/// cached). Returns the PTX and whether it came from the cache.
fn ptx_for(src: &KernelSource, key: &CacheKey<'_>) -> Result<(String, bool), KernelError> {
    let arch = format!("sm_{}{}", key.cc.0, key.cc.1);
    let options = compile_options(&arch, false);
    let hash = key.hash(&src.full_source(), &options);
    let path = cache_dir().map(|d| d.join(key.file_name(src, hash)));
    if let Some(p) = &path {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            if ptx.contains(".entry") {
                return Ok((ptx, true));
            }
        }
    }
    let compiled = compile(src, &arch, false)?;
    if let Some(p) = &path {
        if let Err(e) = write_atomically(p, &compiled.ptx) {
            tracing::warn!(path = %p.display(), error = %e, "PTX cache not written; kernels will be compiled again next start");
        }
    }
    Ok((compiled.ptx, false))
}

fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().expect("cache files live in a folder");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}",
        std::process::id(),
        path.file_name().expect("named").to_string_lossy()
    ));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Every kernel, loaded into one context. Per-dtype kernels are indexed by
/// `ItemDtype::index()`.
pub struct Kernels {
    pub embedding_bag: [CudaFunction; 3],
    pub ranker_inputs: [CudaFunction; 3],
    pub topk_partial: [CudaFunction; 3],
    /// The bf16 fused kernel on tensor cores (sm_80+).
    pub topk_partial_tc: CudaFunction,
    pub score_rows: [CudaFunction; 3],
    pub scatter_rows: [CudaFunction; 3],
    pub scatter_attrs: CudaFunction,
    pub fill_uniform: [CudaFunction; 3],
    pub topk_merge: CudaFunction,
    pub topk_dense_partial: CudaFunction,
    pub fill_u8: CudaFunction,
    pub iota_u64: CudaFunction,
    pub bias_act: CudaFunction,
    pub sasrec_inputs: [CudaFunction; 3],
    pub layer_norm: CudaFunction,
    pub attention: CudaFunction,
    pub add: CudaFunction,
    pub copy: CudaFunction,
    pub last_rows: CudaFunction,
}

impl Kernels {
    /// Compiles (or reads from the cache) and loads every kernel; `smem_optin`
    /// is the dynamic shared memory the top-k kernels may use.
    pub fn load(
        ctx: &Arc<CudaContext>,
        key: &CacheKey<'_>,
        smem_optin: usize,
    ) -> Result<Kernels, KernelError> {
        let load_err = |src: &KernelSource, e: cudarc::driver::DriverError| KernelError::Load {
            file: src.file,
            message: e.to_string(),
        };
        let mut modules: Vec<Arc<CudaModule>> = Vec::new();
        for src in SOURCES {
            let started = std::time::Instant::now();
            let (ptx, cached) = ptx_for(src, key)?;
            let module = match ctx.load_module(Ptx::from_src(ptx)) {
                Ok(m) => m,
                Err(e) if cached => {
                    // A stale or damaged cache entry: compile afresh once.
                    tracing::warn!(file = src.file, error = %e, "cached PTX did not load; recompiling");
                    let arch = format!("sm_{}{}", key.cc.0, key.cc.1);
                    let ptx = compile(src, &arch, false)?.ptx;
                    ctx.load_module(Ptx::from_src(ptx))
                        .map_err(|e| load_err(src, e))?
                }
                Err(e) => return Err(load_err(src, e)),
            };
            tracing::debug!(
                file = src.file,
                cached,
                ms = started.elapsed().as_millis() as u64,
                "kernels loaded"
            );
            modules.push(module);
        }
        let get = |name: &str| -> Result<CudaFunction, KernelError> {
            let src = SOURCES
                .iter()
                .position(|s| s.entries.contains(&name))
                .expect("every kernel name is listed in SOURCES");
            modules[src]
                .load_function(name)
                .map_err(|e| KernelError::Function {
                    name: name.to_string(),
                    message: e.to_string(),
                })
        };
        let per_dtype = |stem: &str| -> Result<[CudaFunction; 3], KernelError> {
            let [a, b, c] = ItemDtype::ALL.map(|d| format!("{stem}_{}", d.name()));
            Ok([get(&a)?, get(&b)?, get(&c)?])
        };
        let k = Kernels {
            embedding_bag: per_dtype("embedding_bag")?,
            ranker_inputs: per_dtype("ranker_inputs")?,
            topk_partial: per_dtype("score_topk_partial")?,
            topk_partial_tc: get("score_topk_partial_tc_bf16")?,
            score_rows: per_dtype("score_rows")?,
            scatter_rows: per_dtype("scatter_rows")?,
            scatter_attrs: get("scatter_attrs")?,
            fill_uniform: per_dtype("fill_uniform")?,
            topk_merge: get("topk_merge")?,
            topk_dense_partial: get("topk_dense_partial")?,
            fill_u8: get("fill_u8")?,
            iota_u64: get("iota_u64")?,
            bias_act: get("bias_act")?,
            sasrec_inputs: per_dtype("sasrec_inputs")?,
            layer_norm: get("layer_norm")?,
            attention: get("attention")?,
            add: get("add_f32")?,
            copy: get("copy_f32")?,
            last_rows: get("last_rows")?,
        };
        // Above 48 KiB of dynamic shared memory a kernel must opt in; static
        // shared memory counts against the same limit.
        for f in
            k.topk_partial
                .iter()
                .chain([&k.topk_partial_tc, &k.topk_merge, &k.topk_dense_partial])
        {
            let fixed = f.shared_size_bytes().map_err(|e| KernelError::SharedSize {
                message: e.to_string(),
            })?;
            let smem = smem_optin as i32 - fixed;
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem,
            )
            .map_err(|e| KernelError::SharedOptIn {
                smem,
                message: e.to_string(),
            })?;
        }
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_change_with_everything_the_ptx_depends_on() {
        let key = CacheKey {
            device_name: "NVIDIA H100 80GB HBM3",
            cc: (9, 0),
            driver_version: 13000,
            nvrtc: (13, 0),
        };
        let opts = compile_options("sm_90", false);
        let src = &SOURCES[0];
        let h = key.hash(&src.full_source(), &opts);
        assert_eq!(h, key.hash(&src.full_source(), &opts), "deterministic");
        assert_ne!(h, key.hash(&SOURCES[1].full_source(), &opts));
        assert_ne!(
            h,
            key.hash(&src.full_source(), &compile_options("sm_80", false))
        );
        for other in [
            CacheKey {
                driver_version: 12080,
                ..key.clone()
            },
            CacheKey {
                cc: (8, 0),
                ..key.clone()
            },
            CacheKey {
                device_name: "NVIDIA H200",
                ..key.clone()
            },
            CacheKey {
                nvrtc: (13, 1),
                ..key.clone()
            },
        ] {
            assert_ne!(h, other.hash(&src.full_source(), &opts), "{other:?}");
        }
        assert_eq!(
            key.file_name(src, 0xabc),
            "embedding_bag-sm_90-0000000000000abc.ptx"
        );
    }

    #[test]
    fn cache_dir_prefers_xdg() {
        // Read-only check of the rule without touching the process env.
        let d = cache_dir();
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            assert_eq!(d, Some(PathBuf::from(x).join("rankd/ptx")));
        } else if let Some(h) = std::env::var_os("HOME") {
            assert_eq!(d, Some(PathBuf::from(h).join(".cache/rankd/ptx")));
        }
    }

    #[test]
    fn every_entry_is_defined_in_its_source() {
        for s in SOURCES {
            for e in s.entries {
                let stem = e
                    .trim_end_matches("_f32")
                    .trim_end_matches("_f16")
                    .trim_end_matches("_bf16");
                assert!(
                    s.source.contains(e) || s.source.contains(&format!("{stem}_##NAME")),
                    "{} lacks {e}",
                    s.file
                );
            }
        }
    }
}
