#!/usr/bin/env python3
"""Side-by-side step time of partialfc.torch.PartialFC_V2 and the reference insightface PartialFC_V2,
each driven by the same train_v2.py-style iteration on the CPU: a small backbone forward, the head's
loss, backward, SGD step (lr 0.1, momentum 0.9, wd 5e-4) over [backbone, head] param groups,
zero_grad. Prints one JSON line per implementation and, with --impl both, a comparison line.

The reference's files are not part of this repository: put partial_fc_v2.py and losses.py from
insightface recognition/arcface_torch in a folder and pass it with --reference-dir (or
PFC_REFERENCE_DIR). Each implementation runs in its own process, one after the other, so their
memory does not add up.

  python bindings/python/benchmarks/train_step.py --impl both --reference-dir /tmp/ref \
      --classes 1000000 --dim 512 --batch 256 --sample-rate 0.1 --steps 5
"""
import argparse
import json
import os
import subprocess
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--impl", default="both", choices=["ours", "reference", "both"])
ap.add_argument("--reference-dir", default=os.environ.get("PFC_REFERENCE_DIR"))
ap.add_argument("--classes", type=int, default=1_000_000)
ap.add_argument("--dim", type=int, default=512)
ap.add_argument("--batch", type=int, default=256)
ap.add_argument("--sample-rate", type=float, default=0.1)
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--features", type=int, default=512, help="input width of the small backbone")
ap.add_argument("--port", type=int, default=29541)
a = ap.parse_args()

if a.impl == "both":
    results = []
    for impl in ("reference", "ours"):
        args = [sys.executable, __file__] + sys.argv[1:] + ["--impl", impl]  # the last --impl wins
        out = subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)
        results.append(json.loads(out))
    ref, ours = results
    print(json.dumps({"speedup_median": ref["median_step_s"] / ours["median_step_s"],
                      "reference_median_step_s": ref["median_step_s"], "ours_median_step_s": ours["median_step_s"]}))
    sys.exit(0)

import torch  # noqa: E402

torch.manual_seed(0)
if a.impl == "reference":
    if not a.reference_dir:
        sys.exit("--reference-dir (or PFC_REFERENCE_DIR) must name a folder with the reference's partial_fc_v2.py and losses.py")
    import torch.distributed as dist
    torch.Tensor.cuda = lambda self, *args, **kw: self  # the reference hard-codes .cuda()
    sys.path.insert(0, a.reference_dir)
    from partial_fc_v2 import PartialFC_V2  # noqa: E402
    from losses import CombinedMarginLoss  # noqa: E402
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(a.port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    label = "reference PartialFC_V2 (PyTorch %s)" % torch.__version__
else:
    from partialfc.torch import CombinedMarginLoss, PartialFC_V2  # noqa: E402
    import partialfc
    label = "partialfc.torch PartialFC_V2 (libpartialfc %s, PyTorch %s)" % (partialfc.library_version(), torch.__version__)

head = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), a.dim, a.classes, a.sample_rate, False)
head.train()
net = torch.nn.Sequential(torch.nn.Linear(a.features, 512), torch.nn.PReLU(512), torch.nn.Linear(512, a.dim),
                          torch.nn.BatchNorm1d(a.dim))
opt = torch.optim.SGD(params=[{"params": net.parameters()}, {"params": head.parameters()}], lr=0.1, momentum=0.9,
                      weight_decay=5e-4)
batches = [(torch.randn(a.batch, a.features), torch.randint(0, a.classes, (a.batch,))) for _ in range(4)]

times = []
for i in range(a.steps + a.warmup):
    images, labels = batches[i % len(batches)]
    t0 = time.perf_counter()
    loss = head(net(images), labels.clone())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 5)
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t0)
steady = sorted(times[a.warmup:])
median = steady[len(steady) // 2]
print(json.dumps(dict(impl=label, classes=a.classes, dim=a.dim, batch=a.batch, sample_rate=a.sample_rate,
                      steps=a.steps, median_step_s=median, min_step_s=steady[0], images_per_s=a.batch / median,
                      torch_threads=torch.get_num_threads(), loss_last=float(loss))))
