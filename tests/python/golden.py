"""The golden files of ../shared/golden a test can run, without torch (tests/python/test_cuda_emulation.py's
child must not import it)."""
import glob
import json
import os

from safetensors import safe_open

TOLERANCE = 1e-4  # SPEC §7: relative error in f32, norm-wise as the golden README measures it


# Files whose `head` is one of these hold the adaptive margins of SPEC §1.6a (AdaFace,
# CurricularFace, issue #25), from the authors' own heads (`adaptive_golden_files`); every other
# file is a combined-margin case of the reference's PartialFC_V2 (`golden_files`).
ADAPTIVE_MARGIN_HEADS = {"adaface", "curricular"}


def _configs(golden_dir):
    for path in sorted(glob.glob(os.path.join(golden_dir, "*.safetensors"))):
        with safe_open(path, "np") as f:
            cfg = json.loads(f.metadata()["config"])
        head = cfg.get("head")
        assert head is None or head in ADAPTIVE_MARGIN_HEADS, f"{path}: unknown head {head!r}"
        yield path, cfg


def golden_files(golden_dir, world_size):
    files = [(path, cfg) for path, cfg in _configs(golden_dir) if cfg.get("head") is None and cfg["world_size"] == world_size]
    assert files, f"no golden files of world size {world_size}"
    return files


def adaptive_golden_files(golden_dir):
    files = [(path, cfg) for path, cfg in _configs(golden_dir) if cfg.get("head") is not None]
    assert {cfg["head"] for _, cfg in files} == ADAPTIVE_MARGIN_HEADS, files
    return files


