"""The float64 models of SPEC §1.6a (tests/python/model.py: Float64AdaFace, Float64CurricularFace)
against the authors' own heads (../shared/golden/adaface_*, curricular_*): loss, embedding gradient,
centers after SGD and the running statistics, step by step; and their gradients against finite
differences where the margins are the library's own math (sampled columns, r < 1). They are the
reference for the library's adaptive margins (issue #25) where the authors' heads have no vectors."""
import os

import torch
from safetensors.torch import load_file

from golden import adaptive_golden_files
from model import adaptive_margin_head, adaptive_margin_state, golden_step_errors, rel


def test_the_float64_models_reproduce_the_authors_heads(golden_dir):
    for path, cfg in adaptive_golden_files(golden_dir):
        t = load_file(path)
        head = adaptive_margin_head(cfg, t["weight_init"])
        assert adaptive_margin_state(head) == cfg["initial_state"]
        opt = torch.optim.SGD(head.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
        name = os.path.basename(path)
        for step in range(cfg["steps"]):
            errors = golden_step_errors(head, opt, t, step, lambda: head.weight.detach(), torch.float64)
            errors["state"] = rel(torch.tensor(adaptive_margin_state(head)), t[f"state.{step}"])
            for what, err in errors.items():
                assert err < 2e-5, f"{name} step {step} {what}: relative error {err:.3g}"


def test_evaluation_neither_updates_nor_uses_a_new_batchs_statistics(golden_dir):
    for path, cfg in adaptive_golden_files(golden_dir):
        t = load_file(path)
        head = adaptive_margin_head(cfg, t["weight_init"]).eval()
        before = adaptive_margin_state(head)
        first = head(t["emb.0"], t["labels.0"])
        assert adaptive_margin_state(head) == before
        assert head(t["emb.0"], t["labels.0"]) == first


def test_the_models_gradients_on_sampled_columns_match_finite_differences(golden_dir):
    for path, cfg in adaptive_golden_files(golden_dir):
        t = load_file(path)
        head = adaptive_margin_head(cfg, t["weight_init"])
        labels = t["labels.0"][:16]
        gen = torch.Generator().manual_seed(5)
        negatives = torch.randperm(cfg["num_classes"], generator=gen)[:100]
        sampled = torch.unique(torch.cat([labels, negatives]))
        emb = t["emb.0"][:16].to(torch.float64).requires_grad_(True)
        head.train()
        head(emb, labels, sampled)  # the running statistics of a training step, then held
        head.eval()
        loss = head(emb, labels, sampled)
        loss.backward()
        grad_e, grad_w = emb.grad.clone(), head.weight.grad.clone()
        h = 1e-6

        def derivative(tensor, direction):
            with torch.no_grad():
                tensor += h * direction
                up = float(head(emb, labels, sampled))
                tensor -= 2 * h * direction
                down = float(head(emb, labels, sampled))
                tensor += h * direction
            return (up - down) / (2 * h)

        checks = []
        # Embeddings along directions tangent to their row: AdaFace's norms carry no gradient
        # (SPEC §1.6a), and a tangent step leaves them unchanged to first order.
        for _ in range(20):
            row = int(torch.randint(emb.shape[0], (1,), generator=gen))
            v = torch.zeros_like(emb)
            v[row] = torch.randn(emb.shape[1], generator=gen, dtype=torch.float64)
            v[row] -= (v[row] @ emb[row].detach()) / emb[row].detach().norm() ** 2 * emb[row].detach()
            checks.append((emb, v, float((grad_e * v).sum())))
        # Centers of sampled classes, one value at a time.
        for _ in range(20):
            v = torch.zeros_like(head.weight)
            v[sampled[int(torch.randint(len(sampled), (1,), generator=gen))], int(torch.randint(v.shape[1], (1,), generator=gen))] = 1.0
            checks.append((head.weight, v, float((grad_w * v).sum())))
        for tensor, v, analytic in checks:
            fd = derivative(tensor, v)
            assert abs(fd - analytic) <= 1e-7 + 1e-5 * abs(fd), f"{cfg['head']}: fd {fd} vs {analytic}"
