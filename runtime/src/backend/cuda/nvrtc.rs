//! Generated CUDA C → PTX with NVRTC, cached for the life of the process.
//!
//! NVRTC is loaded at run time (cudarc's `dynamic-loading`), and cudarc's
//! loader panics when the library is missing, so [`compile`] asks
//! [`available`] first and nothing here calls into NVRTC without it. It
//! needs no GPU: the PTX test compiles every generated kernel on machines
//! without one.
//!
//! Options: `--gpu-architecture=compute_XY` from the target `sm_XY`,
//! `-std=c++17`, and no fast math: `expf`, `logf`, `tanhf`, `sqrtf` and
//! division keep their full accuracy, so results stay within a few ulps of
//! the CPU backend's.
//!
//! Input: generated CUDA C and a target architecture. Output: PTX, or an
//! [`NvrtcError`]: NVRTC missing (what to install), a target that is not an
//! architecture, or a failed compilation, which carries NVRTC's log and the
//! source it failed on.

use cudarc::nvrtc::{result, sys};
use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::sync::{Mutex, OnceLock, PoisonError};

/// Why NVRTC could not turn a kernel's source into PTX.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum NvrtcError {
    /// libnvrtc.so.13 cannot be loaded; the message says how to install it.
    #[error(
        "NVRTC (libnvrtc.so.13) not found: install the CUDA 13 toolkit or `pip install nvidia-cuda-nvrtc==13.0.88` \
         and put its lib folder (…/site-packages/nvidia/cu13/lib) on LD_LIBRARY_PATH"
    )]
    Missing,
    /// The target is not `sm_XY` or `compute_XY`.
    #[error("`{arch}` is not a GPU architecture (expected e.g. sm_90)")]
    Arch { arch: String },
    /// The generated source contains a NUL byte.
    #[error("the kernel source contains a NUL byte")]
    NulSource,
    /// An option contains a NUL byte.
    #[error("NVRTC option {option:?} contains a NUL byte")]
    NulOption { option: String },
    /// NVRTC could not create a program.
    #[error("NVRTC could not create a program: {0:?}")]
    Create(result::NvrtcError),
    /// The program compiled but NVRTC could not return its PTX.
    #[error("NVRTC could not return the PTX: {0:?}")]
    Ptx(result::NvrtcError),
    /// The source does not compile: NVRTC's status and log, the options,
    /// and the source itself (`code`, not displayed).
    #[error("NVRTC failed ({status:?}) with options {options:?}:\n{log}")]
    Compile { status: result::NvrtcError, options: Vec<String>, log: String, code: String },
}

/// Whether NVRTC can be loaded; the error says how to install it.
pub fn available() -> Result<(), NvrtcError> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries to open the library's candidate
    // file names with libloading (and closes what it opened); it calls no
    // NVRTC function.
    let present = *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() });
    if present {
        Ok(())
    } else {
        Err(NvrtcError::Missing)
    }
}

/// The NVRTC options for target `arch` (`sm_90`, or `compute_90`).
pub fn options(arch: &str) -> Result<Vec<String>, NvrtcError> {
    let digits = arch.strip_prefix("sm_").or_else(|| arch.strip_prefix("compute_")).unwrap_or("");
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(NvrtcError::Arch { arch: arch.to_string() });
    }
    Ok(vec![format!("--gpu-architecture=compute_{digits}"), "-std=c++17".into()])
}

/// The PTX of `source` for target `arch` (e.g. `sm_90`). Compiled once per
/// distinct (source, arch) in a process; a failure carries NVRTC's log.
pub fn compile(source: &str, arch: &str) -> Result<String, NvrtcError> {
    static CACHE: OnceLock<Mutex<HashMap<(u64, String), String>>> = OnceLock::new();
    let options = options(arch)?;
    let key = (super::codegen::content_hash(source), arch.to_string());
    let cache = CACHE.get_or_init(Default::default);
    if let Some(ptx) = cache.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
        return Ok(ptx.clone());
    }
    available()?;
    let ptx = compile_uncached(source, &options)?;
    cache.lock().unwrap_or_else(PoisonError::into_inner).insert(key, ptx.clone());
    Ok(ptx)
}

/// One NVRTC program: create, compile, read the PTX (or the log), destroy.
fn compile_uncached(source: &str, options: &[String]) -> Result<String, NvrtcError> {
    let src = CString::new(source).map_err(|_| NvrtcError::NulSource)?;
    for o in options {
        if o.contains('\0') {
            return Err(NvrtcError::NulOption { option: o.clone() });
        }
    }
    let prog = result::create_program(&src, None).map_err(NvrtcError::Create)?;
    // SAFETY: `prog` was just created and is destroyed once, below, after
    // its last use; `src` outlives it. The options contain no NUL byte
    // (checked above), so cudarc's conversion of them does not panic.
    let compiled = unsafe { result::compile_program(prog, options) };
    let outcome = match compiled {
        // SAFETY: as above; the program compiled.
        Ok(()) => unsafe { result::get_ptx(prog) }.map(|p| text(&p)).map_err(NvrtcError::Ptx),
        Err(status) => {
            // SAFETY: as above.
            let log = unsafe { result::get_program_log(prog) }.map(|l| text(&l)).unwrap_or_default();
            Err(NvrtcError::Compile { status, options: options.to_vec(), log, code: source.to_string() })
        }
    };
    // SAFETY: `prog` is live and not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    outcome
}

/// A NUL-terminated buffer returned by NVRTC as text.
fn text(buf: &[c_char]) -> String {
    // SAFETY: c_char and u8 have the same size and alignment; the slice is
    // borrowed for the length of this call.
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), buf.len()) };
    match CStr::from_bytes_until_nul(bytes) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn options_name_the_virtual_architecture() {
        assert_eq!(super::options("sm_90").unwrap(), vec!["--gpu-architecture=compute_90", "-std=c++17"]);
        assert_eq!(super::options("sm_90a").unwrap()[0], "--gpu-architecture=compute_90a");
        assert_eq!(super::options("volta"), Err(super::NvrtcError::Arch { arch: "volta".into() }));
        assert!(super::options("sm_").is_err());
        assert_eq!(super::options("sm_").unwrap_err().to_string(), "`sm_` is not a GPU architecture (expected e.g. sm_90)");
    }

    #[test]
    fn a_failed_compilation_carries_the_log_and_the_source() {
        if super::available().is_err() {
            eprintln!("skipped: NVRTC not found");
            return;
        }
        let source = "extern \"C\" __global__ void broken() { undeclared = 1; }";
        let e = super::compile(source, "sm_90").unwrap_err();
        let super::NvrtcError::Compile { log, code, options, .. } = &e else { panic!("{e:?}") };
        assert!(log.contains("undeclared"), "{log}");
        assert_eq!(code, source);
        assert_eq!(e.to_string(), format!("NVRTC failed (NvrtcError(NVRTC_ERROR_COMPILATION)) with options {options:?}:\n{log}"));
    }
}
