//! The kernel registry: every `kernels/*.cu` source, embedded in the library, compiled by NVRTC for
//! the device's architecture on first use and cached per architecture. The compile-check test
//! (tests/all/kernels.rs) compiles the same list, so a kernel cannot ship without being checked.

use crate::error::{Error, Result, Status};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::sync::OnceLock;

/// One compilation unit and the entry points it defines.
pub struct KernelSource {
    pub file: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

/// Device helpers prepended to every source (NVRTC sees no CUDA headers here): common.cuh, then
/// storage.cuh (the stored types of centers and optimizer state, and their rounding).
pub const COMMON: &str = concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/storage.cuh"));

pub const REGISTRY: &[KernelSource] = &[
    KernelSource {
        file: "normalize.cu",
        source: include_str!("../../../kernels/normalize.cu"),
        entries: &["normalize_rows", "gather_centers", "gather_centers_bf16", "widen_bf16", "convert_f32", "verdict_reset", "check_batch", "describe_batch"],
    },
    KernelSource {
        file: "sampling.cu",
        source: include_str!("../../../kernels/sampling.cu"),
        entries: &[
            "select_reset",
            "sample_keys",
            "mark_positives",
            "select_count",
            "radix_histogram",
            "radix_pick",
            "count_selected",
            "compaction_offsets",
            "compact_selected",
            "all_classes",
            "label_columns",
        ],
    },
    KernelSource {
        file: "softmax.cu",
        source: include_str!("../../../kernels/softmax.cu"),
        entries: &["target_logits", "row_stats", "combine_row_stats", "rescale_sums", "check_loss"],
    },
    KernelSource {
        file: "margin.cu",
        source: include_str!("../../../kernels/margin.cu"),
        entries: &["embedding_norms", "adaface_scalers", "target_cosines", "target_cosines_bf16", "curricular_margins"],
    },
    KernelSource {
        file: "init.cu",
        source: include_str!("../../../kernels/init.cu"),
        entries: &["init_centers", "init_centers_bf16"],
    },
    KernelSource {
        file: "gradient.cu",
        source: include_str!("../../../kernels/gradient.cu"),
        entries: &[
            "cos_gradient",
            "embedding_grad",
            "project_center_grads",
            "project_center_grads_bf16",
            "update_sgd",
            "update_sgd_bf16",
            "update_adamw",
            "update_adamw_bf16",
            "flag_non_finite",
        ],
    },
    KernelSource {
        file: "topk.cu",
        source: include_str!("../../../kernels/topk.cu"),
        entries: &["center_inv_norms", "topk_chunk"],
    },
];

/// NVRTC output of one source: the PTX, the CUBIN for the same real architecture, and the
/// compiler's log (warnings).
pub struct Compiled {
    pub ptx: String,
    /// What the library loads: machine code for the device itself, so the driver need not JIT
    /// PTX, and a PTX ISA newer than the driver knows (a newer NVRTC's) cannot be refused.
    pub cubin: Vec<u8>,
    pub log: String,
}

fn nvrtc_error(file: &str, what: &str, detail: impl std::fmt::Display) -> Error {
    Error::new(Status::Device, format!("NVRTC {what} for kernels/{file}: {detail}"))
}

/// Compiles one registered source for `arch` (e.g. "sm_90"), returning the PTX and the log.
pub fn compile(k: &KernelSource, arch: &str) -> Result<Compiled> {
    use cudarc::nvrtc::result;
    // SAFETY: only asks the dynamic loader whether the library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::new(Status::Unavailable, "NVRTC 13 (libnvrtc.so.13) is not on the loader path"));
    }
    let text = CString::new(format!("{COMMON}\n#line 1 \"{}\"\n{}", k.file, k.source)).expect("sources hold no NUL");
    let name = CString::new(k.file).expect("file names hold no NUL");
    let prog = result::create_program(&text, Some(&name)).map_err(|e| nvrtc_error(k.file, "create", e))?;
    let options = [format!("--gpu-architecture={arch}"), "--std=c++17".into(), "-default-device".into()];
    // SAFETY: `prog` was created above and is destroyed once, below.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|raw| unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().trim().to_string())
        .unwrap_or_default();
    let outputs = match compiled {
        Ok(()) => unsafe { result::get_ptx(prog) }
            .map(|raw| unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned())
            .map_err(|e| nvrtc_error(k.file, "get_ptx", e))
            .and_then(|ptx| Ok((ptx, unsafe { cubin_of(prog) }.map_err(|e| nvrtc_error(k.file, "get_cubin", e))?))),
        Err(e) => Err(nvrtc_error(k.file, "compile", format!("{e}\n{log}"))),
    };
    let _ = unsafe { result::destroy_program(prog) };
    let (ptx, cubin) = outputs?;
    Ok(Compiled { ptx, cubin, log })
}

/// The CUBIN of a program compiled for a real architecture (`sm_XY`).
///
/// # Safety
/// `prog` is a live, successfully compiled program.
unsafe fn cubin_of(prog: cudarc::nvrtc::sys::nvrtcProgram) -> std::result::Result<Vec<u8>, cudarc::nvrtc::result::NvrtcError> {
    use cudarc::nvrtc::sys;
    let mut size = 0usize;
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result()?;
    let mut cubin = vec![0u8; size];
    unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }.result()?;
    Ok(cubin)
}

/// CUBIN of every registered source for an architecture, compiled once per process.
pub fn cubin_for(arch: &str) -> Result<Vec<(&'static KernelSource, Vec<u8>)>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Vec<Vec<u8>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock();
    if !cache.contains_key(arch) {
        let cubins = REGISTRY.iter().map(|k| compile(k, arch).map(|c| c.cubin)).collect::<Result<Vec<_>>>()?;
        cache.insert(arch.to_string(), cubins);
    }
    Ok(REGISTRY.iter().zip(cache[arch].iter().cloned()).collect())
}

/// The `sm_XY` architecture NVRTC targets for a compute capability.
pub fn arch_of(compute_capability: (i32, i32)) -> String {
    format!("sm_{}{}", compute_capability.0, compute_capability.1)
}

/// The value of `#define NAME value` in kernels/common.cuh, for tests that hold the host's
/// constants and the kernels' together.
#[cfg(test)]
pub(crate) fn defined(name: &str) -> u64 {
    let line = COMMON.lines().find(|l| l.split_whitespace().take(2).eq(["#define", name])).unwrap_or_else(|| panic!("common.cuh defines no {name}"));
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_is_registered_once_with_its_entries_present() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu"))
            .collect();
        on_disk.sort();
        let mut registered: Vec<String> = REGISTRY.iter().map(|k| k.file.to_string()).collect();
        registered.sort();
        assert_eq!(on_disk, registered, "kernels/*.cu and the registry disagree");
        for k in REGISTRY {
            for e in k.entries {
                assert!(k.source.contains(&format!("__global__ void {e}(")), "{}: no entry {e}", k.file);
            }
        }
        assert_eq!(arch_of((9, 0)), "sm_90");
    }
}
