"""The golden files of ../shared/golden a test can run, without torch (tests/python/test_cuda_emulation.py's
child must not import it)."""
import glob
import json
import os

from safetensors import safe_open

TOLERANCE = 1e-4  # SPEC §7: relative error in f32, norm-wise as the golden README measures it


# Files whose `head` is one of these hold the adaptive margins of SPEC §1.6a (AdaFace,
# CurricularFace, issue #25), which the torch module does not offer yet (tests/all/golden.rs runs
# AdaFace's through the C ABI); every other file is a combined-margin case of the reference's
# PartialFC_V2 and runs here.
ADAPTIVE_MARGIN_HEADS = {"adaface", "curricular"}


def golden_files(golden_dir, world_size):
    files = []
    for path in sorted(glob.glob(os.path.join(golden_dir, "*.safetensors"))):
        with safe_open(path, "np") as f:
            cfg = json.loads(f.metadata()["config"])
        head = cfg.get("head")
        assert head is None or head in ADAPTIVE_MARGIN_HEADS, f"{path}: unknown head {head!r}"
        if head is None and cfg["world_size"] == world_size:
            files.append((path, cfg))
    assert files, f"no golden files of world size {world_size}"
    return files


