"""A Python program on the CUDA backend: the reference's golden vectors through `partialfc.Head` on
PFC_BACKEND_CUDA, in a child interpreter whose loader path names the host emulation of the CUDA
driver, cuBLAS and NCCL (tests/cuda-emulator/, built by scripts/cuda-emulator.sh) — what a user gets
with LD_LIBRARY_PATH=target/cuda-emulator:.tools/nvrtc/nvidia/cu13/lib. Within 1e-4, as on the CPU.

The child does not import torch: a CUDA build of PyTorch loads NVIDIA's own cuBLAS at import, and a
process keeps the first library of a name it loads, so the head would then find NVIDIA's cuBLAS,
which needs a real GPU."""
import ctypes
import os
import subprocess
import sys



def test_golden_files_through_a_head_on_the_emulated_cuda_backend(golden_dir):
    from conftest import REPO  # not at the top: the child runs without pytest
    emulator = os.path.join(REPO, "target", "cuda-emulator")
    assert os.path.exists(os.path.join(emulator, "libcuda.so.1")), "run bash scripts/cuda-emulator.sh first"
    loader_path = f"{emulator}:{os.path.join(REPO, '.tools', 'nvrtc', 'nvidia', 'cu13', 'lib')}"
    env = dict(os.environ, LD_LIBRARY_PATH=loader_path)
    run = subprocess.run([sys.executable, os.path.abspath(__file__), golden_dir], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    assert "golden files on CUDA:" in run.stdout, run.stdout


def main(golden_dir):
    import numpy as np
    from safetensors.numpy import load_file

    from partialfc import Batch, Head, config
    from partialfc import _native as n
    from golden import TOLERANCE, golden_files

    def rel(a, b):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    checked = 0
    for path, g in golden_files(golden_dir, 1):
        t = load_file(path)
        c, d = g["num_classes"], g["embedding_dim"]
        devices = (ctypes.c_int32 * 1)(0)
        fields = dict(num_classes=c, embedding_dim=d, scale=g["scale"], m1=g["m1"], m2=g["m2"], m3=g["m3"],
                      interclass_filter=g["interclass_filtering_threshold"], lr=g["lr"], weight_decay=g["weight_decay"],
                      sample_rate=g["sample_rate"], backend=n.PFC_BACKEND_CUDA,
                      devices=ctypes.cast(devices, ctypes.POINTER(ctypes.c_int32)))
        if g["optimizer"] == "adamw":
            fields.update(optimizer=n.PFC_OPTIMIZER_ADAMW, beta1=g["adamw_betas"][0], beta2=g["adamw_betas"][1],
                          eps=g["adamw_eps"])
        else:
            fields.update(momentum=g["momentum"])
        head = Head(config(**fields), keep=(devices,))
        init = np.ascontiguousarray(t["weight_init"], np.float32)
        head.set_centers(0, c, init.ctypes.data)
        name = os.path.basename(path)
        for step in range(g["steps"]):
            emb = np.ascontiguousarray(t[f"emb.{step}"], np.float32)
            labels = np.ascontiguousarray(t[f"labels.{step}"], np.int64)
            grad = np.zeros_like(emb)
            stats = head.train_step([Batch(emb.ctypes.data, labels.ctypes.data, grad.ctypes.data, len(labels), n.PFC_DTYPE_F32)])
            centers = np.zeros((c, d), np.float32)
            head.get_centers(0, c, centers.ctypes.data)
            errors = {
                "loss": rel([stats.loss], t[f"loss.{step}"]),
                "grad_emb": rel(grad, t[f"grad_emb.{step}"]),
                "weight": rel(centers, t[f"weight.{step}"]),
            }
            for what, err in errors.items():
                assert err < TOLERANCE, f"{name} step {step} {what}: relative error {err:.3g} on CUDA"
        head.close()
        checked += 1
    print(f"golden files on CUDA: {checked}")


if __name__ == "__main__":
    main(sys.argv[1])
