//! Every CUDA kernel compiles under NVRTC 13.0 (from PyPI, installed by scripts/test.sh) for the
//! lent GPUs' architecture, to PTX and to the CUBIN the library loads, with no error and no
//! warning. No GPU is needed.

use partialfc::backend::cuda::kernels::{compile, REGISTRY};

#[test]
fn every_kernel_compiles_cleanly_with_nvrtc() {
    // SAFETY: only asks the dynamic loader whether the library can be opened.
    let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    assert!(
        present,
        "libnvrtc.so.13 is not on the loader path: run the tests through scripts/test.sh, which installs NVRTC 13.0 from PyPI"
    );
    for arch in ["sm_90", "sm_80"] {
        for k in REGISTRY {
            let out = compile(k, arch).unwrap_or_else(|e| panic!("{arch}: {}", e.message));
            assert!(out.log.is_empty(), "kernels/{} for {arch} compiled with warnings:\n{}", k.file, out.log);
            for entry in k.entries {
                assert!(out.ptx.contains(&format!(".entry {entry}(")), "kernels/{}: no entry {entry} in the PTX", k.file);
            }
            assert!(out.ptx.contains(&format!(".target {arch}")), "kernels/{}: PTX not for {arch}", k.file);
            // The CUBIN the library loads: an ELF image of machine code for that architecture.
            assert_eq!(&out.cubin[..4], b"\x7fELF", "kernels/{}: no CUBIN for {arch}", k.file);
            for entry in k.entries {
                let name = entry.as_bytes();
                assert!(out.cubin.windows(name.len()).any(|w| w == name), "kernels/{}: no {entry} in the CUBIN", k.file);
            }
        }
    }
}
