"""One pfc_head: creation from keyword settings, the calls of the C ABI with their status turned into
PartialFCError, and destruction. Buffers are passed as addresses (int) of memory the caller keeps
alive for the call; the library keeps no pointer after a call returns."""
import ctypes
import threading

from . import _native as n


class PartialFCError(RuntimeError):
    """A failed libpartialfc call: `status` is the pfc_status code, `status_name` its PFC_ERR_ name,
    `message` the library's explanation (pfc_last_error)."""

    def __init__(self, status, message, call=None):
        self.status = status
        self.status_name = n.STATUS_NAMES.get(status, f"status {status}")
        self.message = message
        self.call = call
        where = f"{call}: " if call else ""
        super().__init__(f"{where}{self.status_name}: {message}")


def check(status, call):
    if status != n.PFC_OK:
        raise PartialFCError(status, n.last_error(), call)


def config(**fields):
    """A pfc_config from pfc_config_init's defaults with `fields` set (names of pfc_config)."""
    cfg = n.pfc_config()
    n.lib.pfc_config_init(ctypes.byref(cfg))
    names = {f for f, _ in n.pfc_config._fields_}
    for key, value in fields.items():
        if key not in names:
            raise TypeError(f"pfc_config has no field {key!r}")
        setattr(cfg, key, value)
    return cfg


def config_dict(cfg):
    return {name: getattr(cfg, name) for name, _ in n.pfc_config._fields_}


class Batch:
    """One local shard's batch: addresses of embeddings, labels and (for training) gradients."""

    __slots__ = ("embeddings", "labels", "grad_embeddings", "rows", "dtype", "memory", "stream")

    def __init__(self, embeddings, labels, grad_embeddings, rows, dtype, memory=n.PFC_MEMORY_HOST, stream=None):
        self.embeddings = embeddings
        self.labels = labels
        self.grad_embeddings = grad_embeddings
        self.rows = rows
        self.dtype = dtype
        self.memory = memory
        self.stream = stream

    def c(self):
        return n.pfc_batch(
            embeddings=self.embeddings,
            labels=ctypes.cast(self.labels, ctypes.POINTER(ctypes.c_int64)),
            grad_embeddings=self.grad_embeddings,
            batch_size=self.rows,
            dtype=self.dtype,
            memory=self.memory,
            stream=self.stream,
        )


class Head:
    """A head created from a pfc_config (see `config`). `keep` holds Python objects the config's
    pointers refer to (devices, NCCL id, the all-gather callback) for the head's lifetime."""

    def __init__(self, cfg, keep=()):
        self.cfg = cfg
        self._keep = tuple(keep)
        handle = n.HEAD()
        check(n.lib.pfc_create(ctypes.byref(cfg), ctypes.byref(handle)), "pfc_create")
        self._handle = handle
        # The library serializes calls on one head; this lock keeps destroy from racing a call.
        self._lock = threading.Lock()

    @property
    def handle(self):
        if self._handle is None:
            raise PartialFCError(n.PFC_ERR_NULL_ARGUMENT, "the head was closed", "partialfc")
        return self._handle

    def close(self):
        with self._lock:
            if self._handle is not None:
                n.lib.pfc_destroy(self._handle)
                self._handle = None

    def __del__(self):
        # Interpreter shutdown may have torn down the module globals already.
        if getattr(self, "_handle", None) is not None and n is not None and n.lib is not None:
            n.lib.pfc_destroy(self._handle)
            self._handle = None

    def _batches(self, batches):
        arr = (n.pfc_batch * len(batches))(*[b.c() for b in batches])
        return arr, len(batches)

    def _stepping(self, fn, call, batches):
        arr, count = self._batches(batches)
        stats = n.pfc_step_stats()
        with self._lock:
            check(fn(self.handle, arr, count, ctypes.byref(stats)), call)
        return stats

    def train_step(self, batches):
        return self._stepping(n.lib.pfc_train_step, "pfc_train_step", batches)

    def train_compute(self, batches):
        return self._stepping(n.lib.pfc_train_compute, "pfc_train_compute", batches)

    def evaluate(self, batches):
        return self._stepping(n.lib.pfc_evaluate, "pfc_evaluate", batches)

    def train_apply(self):
        with self._lock:
            check(n.lib.pfc_train_apply(self.handle), "pfc_train_apply")

    def train_discard(self):
        with self._lock:
            check(n.lib.pfc_train_discard(self.handle), "pfc_train_discard")

    def set_learning_rate(self, lr):
        with self._lock:
            check(n.lib.pfc_set_learning_rate(self.handle, lr), "pfc_set_learning_rate")

    def local_classes(self):
        first, count = ctypes.c_uint64(), ctypes.c_uint64()
        with self._lock:
            check(n.lib.pfc_local_classes(self.handle, ctypes.byref(first), ctypes.byref(count)), "pfc_local_classes")
        return first.value, count.value

    def margin_state(self):
        """The margin's running statistics (pfc_margin_state): AdaFace's [batch_mean, batch_std],
        CurricularFace's [t], none for the combined margin."""
        count = ctypes.c_uint32()
        with self._lock:
            check(n.lib.pfc_margin_state(self.handle, None, 0, ctypes.byref(count)), "pfc_margin_state")
            out = (ctypes.c_float * count.value)()
            check(n.lib.pfc_margin_state(self.handle, out, count, ctypes.byref(count)), "pfc_margin_state")
        return list(out[:count.value])

    def set_margin_state(self, values):
        """Restores the running statistics as margin_state() listed them (pfc_set_margin_state)."""
        values = (ctypes.c_float * len(values))(*values)
        with self._lock:
            check(n.lib.pfc_set_margin_state(self.handle, values, len(values)), "pfc_set_margin_state")

    def get_centers(self, first, count, out_address, normalized=False):
        ptr = ctypes.cast(out_address, ctypes.POINTER(ctypes.c_float))
        with self._lock:
            check(n.lib.pfc_get_centers(self.handle, first, count, int(normalized), ptr), "pfc_get_centers")

    def set_centers(self, first, count, in_address):
        ptr = ctypes.cast(in_address, ctypes.POINTER(ctypes.c_float))
        with self._lock:
            check(n.lib.pfc_set_centers(self.handle, first, count, ptr), "pfc_set_centers")

    def save_checkpoint(self, directory):
        with self._lock:
            check(n.lib.pfc_save_checkpoint(self.handle, str(directory).encode()), "pfc_save_checkpoint")

    def load_checkpoint(self, directory):
        with self._lock:
            check(n.lib.pfc_load_checkpoint(self.handle, str(directory).encode()), "pfc_load_checkpoint")

    def export_centers(self, path, fmt=n.PFC_FORMAT_SAFETENSORS, dtype=n.PFC_DTYPE_F32, normalized=False):
        with self._lock:
            check(n.lib.pfc_export_centers(self.handle, str(path).encode(), fmt, dtype, int(normalized)),
                  "pfc_export_centers")

    def search(self, queries_address, rows, k, ids_address, scores_address):
        with self._lock:
            check(n.lib.pfc_search(self.handle, ctypes.cast(queries_address, ctypes.POINTER(ctypes.c_float)), rows, k,
                                   ctypes.cast(ids_address, ctypes.POINTER(ctypes.c_int64)),
                                   ctypes.cast(scores_address, ctypes.POINTER(ctypes.c_float))), "pfc_search")


class Index:
    """Search-only centers (pfc_index): an exported file of any PFC_FORMAT_* or a checkpoint
    directory. `search` fills `ids` (n × k int64) and `scores` (n × k float32) at the given addresses."""

    def __init__(self, path):
        handle = n.INDEX()
        check(n.lib.pfc_index_open(str(path).encode(), ctypes.byref(handle)), "pfc_index_open")
        self._handle = handle

    def info(self):
        """(num_classes, embedding_dim)."""
        classes, dim = ctypes.c_uint64(), ctypes.c_uint32()
        check(n.lib.pfc_index_info(self._open(), ctypes.byref(classes), ctypes.byref(dim)), "pfc_index_info")
        return classes.value, dim.value

    def search(self, queries_address, rows, k, ids_address, scores_address):
        check(n.lib.pfc_index_search(self._open(), ctypes.cast(queries_address, ctypes.POINTER(ctypes.c_float)), rows, k,
                                     ctypes.cast(ids_address, ctypes.POINTER(ctypes.c_int64)),
                                     ctypes.cast(scores_address, ctypes.POINTER(ctypes.c_float))), "pfc_index_search")

    def _open(self):
        if self._handle is None:
            raise PartialFCError(n.PFC_ERR_NULL_ARGUMENT, "the index was closed", "partialfc")
        return self._handle

    def close(self):
        if self._handle is not None:
            n.lib.pfc_index_close(self._handle)
            self._handle = None

    def __del__(self):
        if getattr(self, "_handle", None) is not None and n is not None and n.lib is not None:
            self.close()


def nccl_unique_id():
    buf = (ctypes.c_uint8 * n.PFC_NCCL_ID_BYTES)()
    check(n.lib.pfc_nccl_unique_id(buf), "pfc_nccl_unique_id")
    return bytes(buf)
