"""bf16 storage of the centers and their optimizer state (SPEC §2 `storage_dtype`) through the Python
binding: a head created with it trains, holds bf16 values (a float32 whose low 16 bits are zero),
rounds what it is given to nearest, saves and loads its state (into either storage), exports bf16; the
PyTorch drop-in takes `storage_dtype="bf16"` and its state_dict round trip continues bit-identically."""
import io

import pytest
import torch

import partialfc
from partialfc import _native as n
from model import Trainer, backbone, dataset, resumed_identically
from partialfc.torch import CombinedMarginLoss, PartialFC_V2

C, D, B, FEATURES = 240, 32, 24, 40


def low_bits_zero(values):
    return bool((values.view(torch.int32) & 0xFFFF).eq(0).all())


def bf16_nearest(values):
    return values.to(torch.bfloat16).to(torch.float32)


def head_centers(head, c, d):
    out = torch.empty(c, d)
    head.get_centers(0, c, out.data_ptr())
    return out


def train_step(head, emb, labels):
    grad = torch.empty_like(emb)
    batch = partialfc.Batch(emb.data_ptr(), labels.data_ptr(), grad.data_ptr(), emb.shape[0], n.PFC_DTYPE_F32)
    return head.train_step([batch])


def test_a_bf16_head_trains_rounds_saves_loads_and_exports(tmp_path):
    c, d = 60, 16
    torch.manual_seed(5)
    head = partialfc.Head(partialfc.config(num_classes=c, embedding_dim=d, storage_dtype=n.PFC_DTYPE_BF16, seed=3))
    before = head_centers(head, c, d)
    emb, labels = torch.randn(20, d), torch.randint(0, c, (20,))
    stats = train_step(head, emb, labels)
    assert stats.step == 1
    after = head_centers(head, c, d)
    assert low_bits_zero(after) and not torch.equal(after, before)

    values = torch.randn(4, d) * 0.37
    head.set_centers(10, 4, values.data_ptr())
    got = head_centers(head, c, d)[10:14]
    assert torch.equal(got, bf16_nearest(values)) and not torch.equal(got, values)

    head.save_checkpoint(tmp_path / "ckpt")
    saved = head_centers(head, c, d)
    for storage in (n.PFC_DTYPE_BF16, n.PFC_DTYPE_F32):
        other = partialfc.Head(partialfc.config(num_classes=c, embedding_dim=d, storage_dtype=storage, local_shards=2))
        other.load_checkpoint(tmp_path / "ckpt")
        assert torch.equal(head_centers(other, c, d), saved), storage
        other.close()

    path = tmp_path / "centers.safetensors"
    head.export_centers(path, n.PFC_FORMAT_SAFETENSORS, n.PFC_DTYPE_BF16, normalized=False)
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert b'"BF16"' in data[8:8 + header]
    stored = torch.frombuffer(bytearray(data[8 + header:]), dtype=torch.bfloat16).to(torch.float32).view(c, d)
    assert torch.equal(stored, saved)
    with pytest.raises(partialfc.PartialFCError) as e:
        head.export_centers(tmp_path / "c.npy", n.PFC_FORMAT_NPY, n.PFC_DTYPE_BF16)
    assert e.value.status == n.PFC_ERR_INVALID_ARGUMENT and "numpy" in e.value.message
    head.close()


def test_f16_storage_is_refused_naming_the_field():
    with pytest.raises(partialfc.PartialFCError) as e:
        partialfc.Head(partialfc.config(num_classes=10, embedding_dim=4, storage_dtype=n.PFC_DTYPE_F16))
    assert e.value.status == n.PFC_ERR_INVALID_ARGUMENT and "storage_dtype" in e.value.message


def make_trainer(seed, steps, storage_dtype):
    torch.manual_seed(seed)
    # One sampling seed for both modules, as a resumed job passes its own.
    head = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C, 0.5, storage_dtype=storage_dtype, seed=1234)
    return Trainer(backbone(FEATURES, D, seed=seed), head, steps)


@pytest.mark.parametrize("storage_dtype", ["bf16", torch.bfloat16])
def test_the_drop_in_stores_bf16_and_its_state_dict_round_trip_continues_bit_identically(storage_dtype):
    data = dataset(10, B, FEATURES, C)
    a = make_trainer(0, len(data), storage_dtype)
    assert a.head.storage_dtype == "bf16" and "storage_dtype=bf16" in repr(a.head)
    torch.manual_seed(0)
    # The reference's initial weight, as bf16 holds it.
    assert torch.equal(a.head.centers(), bf16_nearest(torch.normal(0, 0.01, (C, D))))
    for images, labels in data[:5]:
        a.step(images, labels)
    assert low_bits_zero(a.head.centers())
    b = resumed_identically(a, lambda: make_trainer(7, len(data), storage_dtype), data[5:])
    assert low_bits_zero(b.head.centers())

    # An f32 module takes the bf16 state exactly.
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)
    saved.seek(0)
    head_state = torch.load(saved, weights_only=True)["state_dict_softmax_fc"]
    f32 = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C, 0.5)
    f32.load_state_dict(head_state)
    assert torch.equal(f32.centers(), head_state["weight"])


def test_the_drop_in_refuses_other_storage():
    for bad in ("f16", torch.float16, "bfloat16"):
        with pytest.raises(ValueError, match="storage_dtype"):
            PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C, storage_dtype=bad)
