//! Finding the CUDA user-space libraries at run time. cudarc loads the driver,
//! cuBLAS and NVRTC by name through the loader path and panics on first use
//! when one is missing, so every entry point here checks presence first and
//! turns absence into a one-line reason.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A folder holding `libnvrtc.so.13` and its builtins, for hosts where it is
/// not on the loader path (a pip-installed NVRTC, say).
pub const NVRTC_DIR_ENV: &str = "RANKD_NVRTC_LIB";

/// Why a CUDA library cannot be loaded. `Clone`, as the answer is kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LibError {
    #[error(
        "NVRTC not found (libnvrtc.so.13: put its folder on LD_LIBRARY_PATH or in {env})",
        env = NVRTC_DIR_ENV
    )]
    NvrtcMissing,
    #[error("{env}={}: {message}", .dir.display(), env = NVRTC_DIR_ENV)]
    Folder { dir: PathBuf, message: String },
    #[error("{env}={}: no {prefix}* in that folder", .dir.display(), env = NVRTC_DIR_ENV)]
    NotInFolder { dir: PathBuf, prefix: String },
    #[error("{}: path contains a NUL byte", .path.display())]
    NulInPath { path: PathBuf },
    #[error("cannot load {}: {why}", .path.display())]
    CannotLoad { path: PathBuf, why: String },
}

extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlerror() -> *mut c_char;
}
const RTLD_NOW: c_int = 2;
const RTLD_GLOBAL: c_int = 0x100;

/// True when the NVIDIA driver library (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open and close the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// True when cuBLAS (and the cuBLASLt it needs) can be loaded.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to open and close the library.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// Makes NVRTC loadable, or says why it is not. Idempotent.
///
/// With `RANKD_NVRTC_LIB` set, NVRTC and its builtins are opened from that
/// folder by absolute path first: the loader then resolves cudarc's later
/// `dlopen("libnvrtc.so.13")` (and NVRTC's own open of
/// `libnvrtc-builtins.so.13.0`) to the copies already loaded, by soname, so no
/// `LD_LIBRARY_PATH` is needed.
pub fn ensure_nvrtc() -> Result<(), LibError> {
    static RESULT: OnceLock<Result<(), LibError>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            if let Some(dir) = std::env::var_os(NVRTC_DIR_ENV) {
                preload_nvrtc(Path::new(&dir))?;
            }
            // SAFETY: only tries to open and close the library.
            if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                Ok(())
            } else {
                Err(LibError::NvrtcMissing)
            }
        })
        .clone()
}

fn preload_nvrtc(dir: &Path) -> Result<(), LibError> {
    let builtins = find_lib(dir, "libnvrtc-builtins.so")?;
    let nvrtc = find_lib(dir, "libnvrtc.so")?;
    for path in [builtins, nvrtc] {
        open_global(&path)?;
        tracing::debug!(path = %path.display(), "preloaded from {NVRTC_DIR_ENV}");
    }
    Ok(())
}

/// The versioned library `prefix.*` in `dir`, skipping NVIDIA's `.alt.`
/// variants.
fn find_lib(dir: &Path, prefix: &str) -> Result<PathBuf, LibError> {
    let entries = std::fs::read_dir(dir).map_err(|e| LibError::Folder {
        dir: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && !n.contains(".alt."))
        })
        .collect();
    found.sort();
    found.pop().ok_or_else(|| LibError::NotInFolder {
        dir: dir.to_path_buf(),
        prefix: prefix.to_string(),
    })
}

fn open_global(path: &Path) -> Result<(), LibError> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| LibError::NulInPath {
        path: path.to_path_buf(),
    })?;
    // SAFETY: dlopen with a valid C string; the handle is kept for the life
    // of the process on purpose (the library must stay loaded).
    let handle = unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let why = unsafe {
            let e = dlerror();
            if e.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(LibError::CannotLoad {
            path: path.to_path_buf(),
            why,
        });
    }
    Ok(())
}

/// Files of loaded libraries whose name starts with one of `prefixes`, read
/// from /proc/self/maps: which copy the loader actually picked, for the log.
pub fn loaded(prefixes: &[&str]) -> Vec<String> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut out: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            Path::new(p)
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| prefixes.iter().any(|pre| n.starts_with(pre)))
        })
        .map(str::to_string)
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_lib_skips_alt_variants_and_says_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "libnvrtc.so.13",
            "libnvrtc.alt.so.13",
            "libnvrtc-builtins.so.13.0",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let got = find_lib(dir.path(), "libnvrtc.so").unwrap();
        assert_eq!(got.file_name().unwrap(), "libnvrtc.so.13");
        let err = find_lib(dir.path(), "libcublas.so").unwrap_err();
        assert!(matches!(err, LibError::NotInFolder { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("{NVRTC_DIR_ENV}="))
                && msg.ends_with("no libcublas.so* in that folder"),
            "{msg}"
        );
    }

    #[test]
    fn loaded_lists_this_process_libc() {
        // Every Linux test binary maps libc; the scan must find it.
        assert!(loaded(&["libc.so", "libc-"])
            .iter()
            .any(|p| p.contains("libc")));
    }
}
