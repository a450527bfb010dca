//! Whether CUDA can be used on this machine, and the GPUs it offers.
//!
//! cudarc loads every CUDA library when it is first called and panics when
//! the library is missing, so each check here asks whether the library can
//! be loaded before anything calls into it. Every failure is one sentence
//! that says what is missing and what to do instead; nothing here panics.
//!
//! `CUDA_VISIBLE_DEVICES` is honoured as the driver honours it: an empty
//! value hides every GPU (the tests use it to reach the "no GPU" path on a
//! machine that has one).

use cudarc::driver::{sys, CudaContext};

/// One physical GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    /// Bytes of device memory.
    pub memory: u64,
}

impl Gpu {
    /// The NVRTC target of this GPU, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        arch(self.capability)
    }
}

/// The NVRTC target of compute capability `(major, minor)`.
pub fn arch((major, minor): (i32, i32)) -> String {
    format!("sm_{major}{minor}")
}

/// What to do when no GPU can be used.
const INSTEAD: &str = "this plan asks for gpu devices; use cpu devices (or `--backend cpu`) or run on a machine with an NVIDIA driver";

/// Whether the CUDA driver can be loaded and sees at least one GPU.
pub fn available() -> Result<(), String> {
    count().map(|_| ())
}

/// Calls `f` (a call into a CUDA library), turning a panic of the library
/// loader (a symbol missing from an older library) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let m = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
        format!("{what} failed inside the CUDA library ({m}); the installed CUDA is likely older than CUDA 13.0, which shardplan needs")
    })
}

/// The number of GPUs the CUDA driver sees (at least one).
pub fn count() -> Result<usize, String> {
    // SAFETY: only opens the library by its usual names to see whether one
    // loads; nothing in it is called.
    if !unsafe { sys::is_culib_present() } {
        return Err(format!("no CUDA driver found (libcuda.so could not be loaded): {INSTEAD}"));
    }
    match guarded("initialising the CUDA driver", CudaContext::device_count)? {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) | Err(cudarc::driver::DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => {
            let hidden = std::env::var_os("CUDA_VISIBLE_DEVICES").is_some_and(|v| v.is_empty());
            let why = if hidden { " (CUDA_VISIBLE_DEVICES is empty)" } else { "" };
            Err(format!("the CUDA driver was loaded but sees no GPU{why}: {INSTEAD}"))
        }
        Err(e) => Err(format!("the CUDA driver could not be initialised ({e:?}): {INSTEAD}")),
    }
}

/// Every GPU the driver sees, with its name, compute capability and memory.
pub fn gpus() -> Result<Vec<Gpu>, String> {
    let n = count()?;
    (0..n)
        .map(|ordinal| {
            let ctx = guarded("opening a GPU", || CudaContext::new(ordinal))?.map_err(|e| format!("cannot open GPU {ordinal} ({e:?})"))?;
            let name = ctx.name().unwrap_or_else(|_| "an unnamed GPU".into());
            let capability = ctx.compute_capability().map_err(|e| format!("cannot read the compute capability of GPU {ordinal} ({e:?})"))?;
            let memory = ctx.total_mem().map_err(|e| format!("cannot read the memory size of GPU {ordinal} ({e:?})"))? as u64;
            Ok(Gpu { ordinal, name, capability, memory })
        })
        .collect()
}

/// Whether cuBLAS (libcublas.so.13) can be loaded.
pub fn cublas_available() -> Result<(), String> {
    // SAFETY: as in `count`: only tries to open the library.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("cuBLAS not found (libcublas.so.13 could not be loaded): add the folder that holds it to LD_LIBRARY_PATH \
             (pip's nvidia-cublas package puts it in nvidia/cublas/lib), or use cpu devices"
            .into())
    }
}

/// Whether NCCL (libnccl.so) can be loaded: collectives between physical GPUs use it.
pub fn nccl_available() -> Result<(), String> {
    // SAFETY: as in `count`: only tries to open the library.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("NCCL not found (libnccl.so could not be loaded; where only libnccl.so.2 exists, link libnccl.so to it in a folder on LD_LIBRARY_PATH)".into())
    }
}

/// The driver with at least one GPU, and cuBLAS. Returns the GPUs.
pub fn check() -> Result<Vec<Gpu>, String> {
    let gpus = gpus()?;
    cublas_available()?;
    Ok(gpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_the_nvrtc_target() {
        assert_eq!(arch((9, 0)), "sm_90");
        assert_eq!(arch((8, 6)), "sm_86");
    }

    #[test]
    fn a_missing_driver_is_an_error_not_a_panic() {
        // On a machine without CUDA this is the "no driver" error; with one,
        // a list of GPUs. Either way, no panic.
        match gpus() {
            Ok(g) => assert!(!g.is_empty()),
            Err(e) => assert!(e.contains("gpu devices") || e.contains("GPU"), "{e}"),
        }
    }
}
