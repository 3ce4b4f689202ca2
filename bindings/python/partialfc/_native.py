"""The C ABI of libpartialfc through ctypes: the library, the structs of include/partialfc.h and the
function prototypes. Nothing here is compiled: the package ships the built library and loads it.

The struct mirrors and constants below are checked against the header by
tests/python/test_abi.py (field names, C types and order, sizes, every PFC_ constant), so the header
stays the one source.

ctypes releases the GIL for the duration of every foreign call (CDLL, not PyDLL): a step of the
head runs while other Python threads go on.
"""
import ctypes
import os
import sys
from ctypes import (CFUNCTYPE, POINTER, Structure, c_char_p, c_double, c_float, c_int32, c_size_t,
                    c_uint8, c_uint32, c_uint64, c_void_p)

# The header's version (Cargo.toml's), which pfc_version() names at run time.
PFC_VERSION_MAJOR = 0
PFC_VERSION_MINOR = 1
PFC_VERSION_PATCH = 0

# Status codes (pfc_status).
PFC_OK = 0
PFC_ERR_NULL_ARGUMENT = 1
PFC_ERR_INVALID_ARGUMENT = 2
PFC_ERR_OUT_OF_MEMORY = 3
PFC_ERR_UNAVAILABLE = 4
PFC_ERR_DEVICE = 5
PFC_ERR_COMMUNICATION = 6
PFC_ERR_IO = 7
PFC_ERR_CORRUPT = 8
PFC_ERR_INCOMPATIBLE = 9
PFC_ERR_PANIC = 10
PFC_ERR_NON_FINITE = 11

PFC_BACKEND_CPU = 0
PFC_BACKEND_CUDA = 1
PFC_DTYPE_F32 = 0
PFC_DTYPE_F16 = 1
PFC_DTYPE_BF16 = 2
PFC_MEMORY_HOST = 0
PFC_MEMORY_DEVICE = 1
PFC_OPTIMIZER_SGD = 0
PFC_OPTIMIZER_ADAMW = 1
PFC_MARGIN_GRAD_STRAIGHT_THROUGH = 0
PFC_MARGIN_GRAD_EXACT = 1
PFC_MARGIN_COMBINED = 0
PFC_MARGIN_ADAFACE = 1
PFC_MARGIN_CURRICULAR = 2
PFC_FORMAT_SAFETENSORS = 0
PFC_FORMAT_NPY = 1
PFC_FORMAT_FVECS = 2
PFC_FORMAT_FAISS = 3
PFC_NCCL_ID_BYTES = 128

STATUS_NAMES = {v: k for k, v in list(globals().items()) if k.startswith("PFC_ERR_") or k == "PFC_OK"}


# int32_t (*pfc_allgather_fn)(void *ctx, const void *send, size_t bytes, void *recv): 0 on success.
pfc_allgather_fn = CFUNCTYPE(c_int32, c_void_p, c_void_p, c_size_t, c_void_p)
FUNCTION_TYPES = {"pfc_allgather_fn": pfc_allgather_fn}


class pfc_config(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("num_classes", c_uint64),
        ("embedding_dim", c_uint32),
        ("sample_rate", c_float),
        ("scale", c_float),
        ("m1", c_float),
        ("m2", c_float),
        ("m3", c_float),
        ("interclass_filter", c_float),
        ("margin_grad", c_int32),
        ("arcface_fallback", c_int32),
        ("optimizer", c_int32),
        ("lr", c_float),
        ("momentum", c_float),
        ("weight_decay", c_float),
        ("beta1", c_float),
        ("beta2", c_float),
        ("eps", c_float),
        ("compute_dtype", c_int32),
        ("seed", c_uint64),
        ("init_std", c_float),
        ("backend", c_int32),
        ("local_shards", c_uint32),
        ("devices", POINTER(c_int32)),
        ("world_size", c_uint32),
        ("first_rank", c_uint32),
        ("nccl_id", POINTER(c_uint8)),
        ("process_count", c_uint32),
        ("process_index", c_uint32),
        ("allgather", pfc_allgather_fn),
        ("allgather_ctx", c_void_p),
        ("margin_kind", c_int32),
        ("margin_m", c_float),
        ("adaface_h", c_float),
        ("adaface_t_alpha", c_float),
        ("storage_dtype", c_int32),
    ]


class pfc_batch(Structure):
    _fields_ = [
        ("embeddings", c_void_p),
        ("labels", POINTER(ctypes.c_int64)),
        ("grad_embeddings", c_void_p),
        ("batch_size", c_uint64),
        ("dtype", c_int32),
        ("memory", c_int32),
        ("stream", c_void_p),
    ]


class pfc_step_stats(Structure):
    _fields_ = [
        ("loss", c_double),
        ("accuracy", c_double),
        ("step", c_uint64),
        ("global_batch", c_uint64),
        ("sampled_classes", c_uint64),
    ]


class pfc_head(Structure):
    """Opaque."""


class pfc_index(Structure):
    """Opaque."""


HEAD = POINTER(pfc_head)
INDEX = POINTER(pfc_index)
STATUS = c_int32

# name: (result, argument types). Functions the loaded library lacks (an older build) are reported
# by `has()` instead of failing the import.
PROTOTYPES = {
    "pfc_config_init": (None, [POINTER(pfc_config)]),
    "pfc_create": (STATUS, [POINTER(pfc_config), POINTER(HEAD)]),
    "pfc_destroy": (None, [HEAD]),
    "pfc_train_step": (STATUS, [HEAD, POINTER(pfc_batch), c_uint32, POINTER(pfc_step_stats)]),
    "pfc_train_compute": (STATUS, [HEAD, POINTER(pfc_batch), c_uint32, POINTER(pfc_step_stats)]),
    "pfc_train_apply": (STATUS, [HEAD]),
    "pfc_train_discard": (STATUS, [HEAD]),
    "pfc_evaluate": (STATUS, [HEAD, POINTER(pfc_batch), c_uint32, POINTER(pfc_step_stats)]),
    "pfc_set_learning_rate": (STATUS, [HEAD, c_float]),
    "pfc_local_classes": (STATUS, [HEAD, POINTER(c_uint64), POINTER(c_uint64)]),
    "pfc_margin_state": (STATUS, [HEAD, POINTER(c_float), c_uint32, POINTER(c_uint32)]),
    "pfc_set_margin_state": (STATUS, [HEAD, POINTER(c_float), c_uint32]),
    "pfc_get_centers": (STATUS, [HEAD, c_uint64, c_uint64, c_int32, POINTER(c_float)]),
    "pfc_set_centers": (STATUS, [HEAD, c_uint64, c_uint64, POINTER(c_float)]),
    "pfc_save_checkpoint": (STATUS, [HEAD, c_char_p]),
    "pfc_load_checkpoint": (STATUS, [HEAD, c_char_p]),
    "pfc_export_centers": (STATUS, [HEAD, c_char_p, c_int32, c_int32, c_int32]),
    "pfc_search": (STATUS, [HEAD, POINTER(c_float), c_uint64, c_uint32, POINTER(ctypes.c_int64), POINTER(c_float)]),
    "pfc_index_open": (STATUS, [c_char_p, POINTER(INDEX)]),
    "pfc_index_info": (STATUS, [INDEX, POINTER(c_uint64), POINTER(c_uint32)]),
    "pfc_index_search": (STATUS, [INDEX, POINTER(c_float), c_uint64, c_uint32, POINTER(ctypes.c_int64), POINTER(c_float)]),
    "pfc_index_close": (None, [INDEX]),
    "pfc_nccl_unique_id": (STATUS, [POINTER(c_uint8)]),
    "pfc_last_error": (c_size_t, [ctypes.c_char_p, c_size_t]),
    "pfc_version": (c_char_p, []),
}

_HERE = os.path.dirname(os.path.abspath(__file__))


def library_path():
    """$PARTIALFC_LIBRARY if set, else the library bundled in this package."""
    explicit = os.environ.get("PARTIALFC_LIBRARY")
    if explicit:
        return explicit
    name = {"darwin": "libpartialfc.dylib", "win32": "partialfc.dll"}.get(sys.platform, "libpartialfc.so")
    return os.path.join(_HERE, name)


def header_path():
    """The header this package was built against (bundled beside the library)."""
    return os.path.join(_HERE, "partialfc.h")


def _load():
    path = library_path()
    if not os.path.exists(path):
        raise ImportError(
            f"libpartialfc not found at {path}: install the package with `pip install ./bindings/python` "
            "(it builds the library with cargo), or set PARTIALFC_LIBRARY to a built libpartialfc")
    lib = ctypes.CDLL(path)
    for name, (res, args) in PROTOTYPES.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = res
            fn.argtypes = args
    return lib


lib = _load()


def has(name):
    """Whether the loaded library exports `name` (functions added after its build are absent)."""
    return getattr(lib, name, None) is not None


def last_error():
    n = lib.pfc_last_error(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    lib.pfc_last_error(buf, n + 1)
    return buf.value.decode("utf-8", "replace")


def version():
    return lib.pfc_version().decode()
