"""The ctypes mirror of include/partialfc.h is checked against the header, so the header stays the one
source: every struct the binding mirrors has the header's fields, C types and order, and the size the
library itself reports; every PFC_ constant has the header's value. Errors from the library arrive
as PartialFCError with the status and the library's message; steps run without the GIL."""
import ctypes
import os
import re
import threading
import time

import pytest
import torch

import partialfc
from partialfc import _native as n
from partialfc import PartialFCError
from conftest import REPO

C_TYPES = {
    "uint8_t": ctypes.c_uint8, "int32_t": ctypes.c_int32, "uint32_t": ctypes.c_uint32, "int64_t": ctypes.c_int64,
    "uint64_t": ctypes.c_uint64, "float": ctypes.c_float, "double": ctypes.c_double, "size_t": ctypes.c_size_t,
}


def headers():
    repo = os.path.join(REPO, "include", "partialfc.h")
    bundled = n.header_path()
    with open(repo) as f:
        text = f.read()
    with open(bundled) as f:
        assert f.read() == text, "the installed package bundles another header than include/partialfc.h: reinstall it"
    return text


def struct_fields(text, name):
    m = re.search(r"typedef struct %s \{(.*?)\} %s;" % (name, name), text, re.S)
    assert m, f"struct {name} not in the header"
    body = re.sub(r"//[^\n]*|/\*.*?\*/", "", m.group(1), flags=re.S)
    fields = []
    for decl in filter(None, (d.strip() for d in body.split(";"))):
        mm = re.fullmatch(r"(const\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(\*?)\s*([A-Za-z_][A-Za-z0-9_]*)", " ".join(decl.split()))
        assert mm, f"unparsed field declaration in {name}: {decl!r}"
        fields.append((mm.group(4), mm.group(2), bool(mm.group(3))))
    return fields


def ctype_matches(ctype, base, pointer):
    if pointer:
        if base == "void":
            return ctype is ctypes.c_void_p
        return hasattr(ctype, "_type_") and ctype._type_ is C_TYPES[base]
    if base in C_TYPES:
        return ctype is C_TYPES[base]
    fn_types = getattr(n, "FUNCTION_TYPES", {})
    return base in fn_types and ctype is fn_types[base]


@pytest.mark.parametrize("struct", ["pfc_config", "pfc_batch", "pfc_step_stats"])
def test_struct_mirrors_match_the_header(struct):
    fields = struct_fields(headers(), struct)
    mirror = getattr(n, struct)._fields_
    assert [f for f, _, _ in fields] == [f for f, _ in mirror], f"{struct}: field names or order differ from the header"
    for (name, base, pointer), (_, ctype) in zip(fields, mirror):
        assert ctype_matches(ctype, base, pointer), f"{struct}.{name}: header {base}{'*' if pointer else ''}, mirror {ctype}"


def test_config_size_is_the_librarys():
    cfg = n.pfc_config()
    n.lib.pfc_config_init(ctypes.byref(cfg))
    assert cfg.struct_size == ctypes.sizeof(n.pfc_config)


def test_constants_match_the_header():
    defines = dict(re.findall(r"#define (PFC_[A-Z0-9_]+) (-?\d+)", headers()))
    assert defines, "no PFC_ constants found in the header"
    mirrored = {k: v for k, v in vars(n).items() if k.startswith("PFC_")}
    assert set(mirrored) == set(defines), f"constants differ: header only {set(defines) - set(mirrored)}, " \
                                          f"mirror only {set(mirrored) - set(defines)}"
    for name, value in defines.items():
        assert mirrored[name] == int(value), name


def test_prototypes_cover_every_function_of_the_header():
    declared = set(re.findall(r"^[a-z_ *]*?\b(pfc_[a-z_]+)\(", headers(), re.M))
    assert declared <= set(n.PROTOTYPES), f"functions without a prototype: {declared - set(n.PROTOTYPES)}"
    assert all(n.has(f) for f in declared)


def test_errors_carry_status_and_message():
    with pytest.raises(PartialFCError) as e:
        partialfc.Head(partialfc.config(num_classes=10, embedding_dim=8, sample_rate=2.0))
    assert e.value.status == n.PFC_ERR_INVALID_ARGUMENT
    assert e.value.status_name == "PFC_ERR_INVALID_ARGUMENT"
    assert "sample_rate" in e.value.message and "sample_rate" in str(e.value)
    assert e.value.call == "pfc_create"


def test_a_step_releases_the_gil():
    # One step long enough to observe (~0.1 s or more); Python keeps running beside it only if the
    # call released the GIL.
    d, c, rows = 256, 60_000, 256
    head = partialfc.Head(partialfc.config(num_classes=c, embedding_dim=d))
    emb, labels, grad = torch.randn(rows, d), torch.randint(0, c, (rows,)), torch.empty(rows, d)
    batch = partialfc.Batch(emb.data_ptr(), labels.data_ptr(), grad.data_ptr(), rows, n.PFC_DTYPE_F32)
    span = {}

    def step():
        span["start"] = time.perf_counter()
        head.train_step([batch])
        span["end"] = time.perf_counter()

    worker = threading.Thread(target=step)
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    assert span["end"] - span["start"] > 0.03, "the step was too short to observe"
    inside = [t for t in ticks if span["start"] + 0.01 < t < span["end"] - 0.01]
    assert len(inside) > 100, "Python did not run while the step ran: the call held the GIL"
    head.close()


def test_exported_centers_searched_through_an_index(tmp_path):
    torch.manual_seed(4)
    c, d = 50, 16
    centers = torch.randn(c, d)
    head = partialfc.Head(partialfc.config(num_classes=c, embedding_dim=d))
    head.set_centers(0, c, centers.data_ptr())
    path = tmp_path / "centers.safetensors"
    head.export_centers(path)
    index = partialfc.Index(path)
    assert index.info() == (c, d)
    ids, scores = torch.empty(c, 2, dtype=torch.int64), torch.empty(c, 2)
    index.search(centers.data_ptr(), c, 2, ids.data_ptr(), scores.data_ptr())
    assert torch.equal(ids[:, 0], torch.arange(c)) and torch.allclose(scores[:, 0], torch.ones(c))
    head_ids, head_scores = torch.empty_like(ids), torch.empty_like(scores)
    head.search(centers.data_ptr(), c, 2, head_ids.data_ptr(), head_scores.data_ptr())
    assert torch.equal(ids, head_ids) and torch.equal(scores, head_scores)
    index.close()
    with pytest.raises(PartialFCError) as e:
        partialfc.Index(tmp_path / "missing.npy")
    assert e.value.status == n.PFC_ERR_IO
