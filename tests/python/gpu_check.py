#!/usr/bin/env python3
"""The PyTorch binding on a GPU (run by scripts/gpu-check.sh on the GPU machine; not collected by
pytest, which runs where there is no GPU). The module moved with .cuda() — the head on the CUDA
backend, embeddings passed as device memory on torch.cuda.current_stream() — against the same module
on the CPU over SGD steps: losses, embedding gradients and centers; f16 embeddings; the state moving
back to a CPU module. Exits non-zero on any mismatch or error.

  PARTIALFC_LIBRARY=.gpu/libpartialfc.so PYTHONPATH=bindings/python:tests/python python3 tests/python/gpu_check.py
"""
import sys

import torch

from partialfc.torch import CombinedMarginLoss, PartialFC_V2

C, D, B, STEPS = 5000, 128, 64, 5


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run(device, sample_rate, dtype):
    torch.manual_seed(0)
    head = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C, sample_rate)
    head.train()
    if device == "cuda":
        head.cuda()
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        emb = torch.randn(B, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
        labels = torch.randint(0, C, (B,), generator=g).to(device)
        loss = head(emb, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        out.append((float(loss), emb.grad.float().cpu(), head.centers()))
    return head, out


def main():
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch", file=sys.stderr)
        return 1
    failures = 0
    for sample_rate, dtype, tol in [(1.0, torch.float32, 1e-4), (0.1, torch.float32, 1e-4), (1.0, torch.float16, 5e-3)]:
        _, cpu = run("cpu", sample_rate, dtype)
        gpu_head, gpu = run("cuda", sample_rate, dtype)
        worst = max(max(abs(a[0] - b[0]) / abs(a[0]), rel(b[1], a[1]), rel(b[2], a[2])) for a, b in zip(cpu, gpu))
        ok = worst < tol
        failures += not ok
        print(f"gpu_check r={sample_rate} {dtype}: worst relative error CUDA vs CPU {worst:.3g} "
              f"({'ok' if ok else 'FAIL'}, tolerance {tol})")
    state = gpu_head.state_dict()
    torch.manual_seed(5)
    back = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C, 1.0)
    back.load_state_dict(state)
    same = torch.equal(back.centers(), gpu_head.centers())
    failures += not same
    print(f"gpu_check state_dict CUDA -> CPU: {'ok' if same else 'FAIL'}")
    print(f"gpu_check: {4 - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
