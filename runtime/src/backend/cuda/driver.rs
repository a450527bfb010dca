//! Whether CUDA can be used on this machine, and the GPUs it offers.
//!
//! cudarc loads every CUDA library when it is first called and panics when
//! the library is missing, so each check here asks whether the library can
//! be loaded before anything calls into it. Every failure is a
//! [`DriverError`] that displays as one sentence saying what is missing and
//! what to do instead; nothing here panics.
//!
//! Input: the machine (its CUDA driver, cuBLAS and NCCL libraries, and
//! `CUDA_VISIBLE_DEVICES`). Output: the GPUs the driver sees ([`Gpu`]), or
//! why none can be used.
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

/// Why CUDA cannot be used: a library that cannot be loaded, a driver
/// that sees no GPU, or a driver call that failed (with the driver's error).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DriverError {
    /// libcuda.so cannot be loaded.
    #[error("no CUDA driver found (libcuda.so could not be loaded): {}", INSTEAD)]
    NoDriver,
    /// The driver sees no GPU (`hidden`: because `CUDA_VISIBLE_DEVICES` is empty).
    #[error("the CUDA driver was loaded but sees no GPU{}: {}", if *.hidden { " (CUDA_VISIBLE_DEVICES is empty)" } else { "" }, INSTEAD)]
    NoGpu { hidden: bool },
    /// Initialising the driver failed.
    #[error("the CUDA driver could not be initialised ({0:?}): {instead}", instead = INSTEAD)]
    Init(cudarc::driver::DriverError),
    /// The library panicked during `what` (a symbol missing from an older library).
    #[error("{what} failed inside the CUDA library ({message}); the installed CUDA is likely older than CUDA 13.0, which shardplan needs")]
    Panicked { what: &'static str, message: String },
    /// GPU `ordinal` cannot be opened.
    #[error("cannot open GPU {ordinal} ({error:?})")]
    Open { ordinal: usize, error: cudarc::driver::DriverError },
    /// GPU `ordinal`'s compute capability cannot be read.
    #[error("cannot read the compute capability of GPU {ordinal} ({error:?})")]
    Capability { ordinal: usize, error: cudarc::driver::DriverError },
    /// GPU `ordinal`'s memory size cannot be read.
    #[error("cannot read the memory size of GPU {ordinal} ({error:?})")]
    Memory { ordinal: usize, error: cudarc::driver::DriverError },
    /// libcublas.so.13 cannot be loaded.
    #[error(
        "cuBLAS not found (libcublas.so.13 could not be loaded): add the folder that holds it to LD_LIBRARY_PATH \
         (pip's nvidia-cublas package puts it in nvidia/cublas/lib), or use cpu devices"
    )]
    NoCublas,
    /// libnccl.so cannot be loaded.
    #[error("NCCL not found (libnccl.so could not be loaded; where only libnccl.so.2 exists, link libnccl.so to it in a folder on LD_LIBRARY_PATH)")]
    NoNccl,
}

/// Whether the CUDA driver can be loaded and sees at least one GPU.
pub fn available() -> Result<(), DriverError> {
    count().map(|_| ())
}

/// Calls `f` (a call into a CUDA library), turning a panic of the library
/// loader (a symbol missing from an older library) into an error.
fn guarded<T>(what: &'static str, f: impl FnOnce() -> T) -> Result<T, DriverError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let message = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
        DriverError::Panicked { what, message }
    })
}

/// The number of GPUs the CUDA driver sees (at least one).
pub fn count() -> Result<usize, DriverError> {
    // SAFETY: only opens the library by its usual names to see whether one
    // loads; nothing in it is called.
    if !unsafe { sys::is_culib_present() } {
        return Err(DriverError::NoDriver);
    }
    match guarded("initialising the CUDA driver", CudaContext::device_count)? {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) | Err(cudarc::driver::DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => {
            let hidden = std::env::var_os("CUDA_VISIBLE_DEVICES").is_some_and(|v| v.is_empty());
            Err(DriverError::NoGpu { hidden })
        }
        Err(e) => Err(DriverError::Init(e)),
    }
}

/// Every GPU the driver sees, with its name, compute capability and memory.
pub fn gpus() -> Result<Vec<Gpu>, DriverError> {
    let n = count()?;
    (0..n)
        .map(|ordinal| {
            let ctx = guarded("opening a GPU", || CudaContext::new(ordinal))?.map_err(|error| DriverError::Open { ordinal, error })?;
            let name = ctx.name().unwrap_or_else(|_| "an unnamed GPU".into());
            let capability = ctx.compute_capability().map_err(|error| DriverError::Capability { ordinal, error })?;
            let memory = ctx.total_mem().map_err(|error| DriverError::Memory { ordinal, error })? as u64;
            Ok(Gpu { ordinal, name, capability, memory })
        })
        .collect()
}

/// Whether cuBLAS (libcublas.so.13) can be loaded.
pub fn cublas_available() -> Result<(), DriverError> {
    // SAFETY: as in `count`: only tries to open the library.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(DriverError::NoCublas)
    }
}

/// Whether NCCL (libnccl.so) can be loaded: collectives between physical GPUs use it.
pub fn nccl_available() -> Result<(), DriverError> {
    // SAFETY: as in `count`: only tries to open the library.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(DriverError::NoNccl)
    }
}

/// The driver with at least one GPU, and cuBLAS. Returns the GPUs.
pub fn check() -> Result<Vec<Gpu>, DriverError> {
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
    fn messages_say_what_is_missing_and_what_to_do() {
        assert_eq!(DriverError::NoDriver.to_string(), format!("no CUDA driver found (libcuda.so could not be loaded): {INSTEAD}"));
        assert_eq!(
            DriverError::NoGpu { hidden: true }.to_string(),
            format!("the CUDA driver was loaded but sees no GPU (CUDA_VISIBLE_DEVICES is empty): {INSTEAD}")
        );
        assert_eq!(DriverError::NoGpu { hidden: false }.to_string(), format!("the CUDA driver was loaded but sees no GPU: {INSTEAD}"));
        assert!(DriverError::NoCublas
            .to_string()
            .starts_with("cuBLAS not found (libcublas.so.13 could not be loaded): add the folder that holds it to LD_LIBRARY_PATH (pip's"));
    }

    #[test]
    fn a_missing_driver_is_an_error_not_a_panic() {
        // On a machine without CUDA this is the "no driver" error; with one,
        // a list of GPUs. Either way, no panic.
        match gpus() {
            Ok(g) => assert!(!g.is_empty()),
            Err(e) => assert!(e.to_string().contains("gpu devices") || e.to_string().contains("GPU"), "{e}"),
        }
    }
}
