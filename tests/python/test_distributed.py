"""Several processes under torch.distributed (gloo), as torchrun starts them: the module's traffic
goes through the all-gather callback over torch.distributed (SPEC §2a). The golden files of 2 and 3
ranks, and train_v2.py's loop over 2 ranks with a DDP backbone against the float64 model."""
import socket

import pytest
import torch.multiprocessing as mp

import dist_workers
from test_golden import golden_files


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_rank_golden_files_through_the_module(golden_dir):
    for world in (2, 3):
        for path, _ in golden_files(golden_dir, world):
            mp.spawn(dist_workers.golden, args=(world, free_port(), path, 1e-4), nprocs=world)


@pytest.mark.parametrize("optimizer,lr,wd,gradient_acc,fp16,skip_at", [
    ("sgd", 0.1, 5e-4, 1, False, ()),
    ("adamw", 1e-3, 0.1, 1, False, ()),
    ("sgd", 0.1, 5e-4, 2, True, (6,)),  # accumulation under GradScaler, one step skipped on both ranks
])
def test_two_process_train_v2_loop_matches_float64_model(optimizer, lr, wd, gradient_acc, fp16, skip_at):
    mp.spawn(dist_workers.loop, nprocs=2, args=(2, free_port(), optimizer, lr, wd, gradient_acc, fp16, skip_at, 1e-4,
                                                301, 64, 16, 20, 48))


@pytest.mark.parametrize("sample_rate", [1.0, 0.4])
def test_two_process_state_dict_round_trip_continues_bit_identically(sample_rate):
    mp.spawn(dist_workers.state_round_trip, args=(2, free_port(), sample_rate, 301, 32, 16, 40), nprocs=2)
