"""The reference's vectors (../shared/golden, produced by insightface's PartialFC_V2) through the
torch module: the reference's weight loaded as a reference state_dict, each step's embeddings and
labels in, the loss, the embedding gradient and, after optimizer.step(), the centers compared."""
import os

import torch
from safetensors.torch import load_file

from golden import TOLERANCE, golden_files
from model import golden_margin, golden_optimizer, golden_step_errors
from partialfc.torch import PartialFC_V2

def test_single_process_golden_files_through_the_module(golden_dir):
    for path, cfg in golden_files(golden_dir, 1):
        t = load_file(path)
        module = PartialFC_V2(golden_margin(cfg), cfg["embedding_dim"], cfg["num_classes"], cfg["sample_rate"])
        module.load_state_dict({"weight": t["weight_init"]})
        opt = golden_optimizer(cfg, module.parameters())
        name = os.path.basename(path)
        for step in range(cfg["steps"]):
            errors = golden_step_errors(module, opt, t, step, module.centers)
            for what, err in errors.items():
                assert err < TOLERANCE, f"{name} step {step} {what}: relative error {err:.3g}"
