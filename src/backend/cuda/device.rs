//! Finding the driver, the GPUs and the CUDA libraries without crashing where they are missing.
//! cudarc loads every library at run time and panics when one is absent, so each is probed first
//! and the probe runs behind a panic boundary as well.

use crate::error::{Error, Result, Status};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What the probe found: the devices this head may use and their compute capability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: i32,
    pub compute_capability: (i32, i32),
}

/// A failed CUDA call (driver, cuBLAS) while working on a device.
pub(super) fn device_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(Status::Device, format!("CUDA {what}: {e}"))
}

fn unavailable(message: impl Into<String>) -> Error {
    Error::new(Status::Unavailable, message)
}

/// Checks that the driver, a GPU for each requested ordinal, NVRTC and cuBLAS are usable.
pub fn probe(ordinals: &[i32]) -> Result<Vec<DeviceInfo>> {
    let outcome = catch_unwind(AssertUnwindSafe(|| probe_inner(ordinals)));
    outcome.unwrap_or_else(|_| Err(unavailable("the CUDA libraries could not be loaded (the loader panicked)")))
}

fn probe_inner(ordinals: &[i32]) -> Result<Vec<DeviceInfo>> {
    use cudarc::driver::{result, sys};
    // SAFETY: only asks the dynamic loader whether the library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err(unavailable("no CUDA driver (libcuda.so) on this machine: use the CPU backend"));
    }
    result::init().map_err(|e| unavailable(format!("the CUDA driver did not initialise: {e}")))?;
    let count = result::device::get_count().map_err(|e| unavailable(format!("cannot count CUDA devices: {e}")))?;
    if count == 0 {
        return Err(unavailable("the CUDA driver reports no GPU"));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(unavailable("NVRTC 13 (libnvrtc.so.13) is not on the loader path; the kernels are compiled at run time"));
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(unavailable("cuBLAS 13 (libcublas.so.13) is not on the loader path"));
    }
    ordinals
        .iter()
        .map(|&ordinal| {
            if ordinal < 0 || ordinal >= count {
                return Err(Error::invalid(format!("device ordinal {ordinal} is outside [0, {count})")));
            }
            let dev = result::device::get(ordinal).map_err(|e| unavailable(format!("GPU {ordinal}: {e}")))?;
            let attr = |a| unsafe { result::device::get_attribute(dev, a) }.map_err(|e| unavailable(format!("GPU {ordinal}: {e}")));
            let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            Ok(DeviceInfo { ordinal, compute_capability: (major, minor) })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics_and_explains_absence() {
        match probe(&[0]) {
            Ok(devices) => assert_eq!(devices.len(), 1),
            Err(e) => {
                assert!(matches!(e.status, Status::Unavailable | Status::InvalidArgument), "{e:?}");
                assert!(!e.message.is_empty());
            }
        }
    }
}
