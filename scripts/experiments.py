#!/usr/bin/env python3
"""The experiments of docs/experiments.md: runs `pfc`, keeps each run's results as JSON under
docs/experiments/results/, and draws the plots (PNG) and tables from them.

    python3 scripts/experiments.py accuracy   # sample rate 1.0 / 0.3 / 0.1 on the same data
    python3 scripts/experiments.py noise      # label noise and conflicts, with and without the filter
    python3 scripts/experiments.py quality [margin…]  # ArcFace vs AdaFace vs CurricularFace, blurred images
    python3 scripts/experiments.py storage    # centers stored in f32, bf16 (stochastic rounding), bf16 to nearest
    python3 scripts/experiments.py scale [C…] # memory and step time as the class count grows
    python3 scripts/experiments.py report     # plots + tables (markdown on stdout)

Needs a release build (cargo build --release) and matplotlib for `report`.
"""
import json, os, resource, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PFC=<path> runs another build (a copy, say, while this tree rebuilds).
PFC = os.environ.get("PFC", os.path.join(ROOT, "target", "release", "pfc"))
RESULTS = os.path.join(ROOT, "docs", "experiments", "results")
PLOTS = os.path.join(ROOT, "docs", "experiments")

# One data set for the accuracy experiments: 20k identities, long tail, noisy images.
DATA = ["--classes", "20000", "--dim", "128", "--batch", "512", "--steps", "1500", "--noise", "1.0",
        "--eval-identities", "2000", "--log-every", "100"]


def train(name, extra, seed="7"):
    out = os.path.join("/tmp", "pfc-exp", name)
    cmd = [PFC, "train", "--out", out] + DATA + ["--seed", seed] + extra
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    with open(os.path.join(out, "summary.json")) as f:
        result = json.load(f)
    result["command"] = "pfc " + " ".join(cmd[1:]).replace(out, "OUT")
    save(name, result)


def save(name, result):
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)


def accuracy():
    for rate in ["1.0", "0.3", "0.1"]:
        train("rate-" + rate, ["--sample-rate", rate])


def noise():
    dirty = ["--sample-rate", "0.1", "--label-noise", "0.2", "--conflicts", "0.1"]
    train("noise-nofilter", dirty)
    train("noise-filter", dirty + ["--filter", "0.4"])
    train("clean-filter", ["--sample-rate", "0.1", "--filter", "0.4"])


# The quality experiment's data: DATA with a share of the images blurred, (share, strongest blur):
# moderate (30%, up to 0.6) and harsh (50%, up to 0.9: many blurred images are unrecognizable).
QUALITY = {"moderate": ("0.3", "0.6"), "harsh": ("0.5", "0.9")}
QUALITY_SEEDS = ["7", "8", "9", "10", "11"]


def quality():
    # Seed 7 is the comparison; the other seeds show how far apart two runs of one margin fall.
    for data, (share, blur) in QUALITY.items():
        for seed in QUALITY_SEEDS:
            for margin in sys.argv[2:] or ["arcface", "adaface", "curricular"]:
                train("quality-%s-%s-seed%s" % (data, margin, seed),
                      ["--sample-rate", "0.1", "--low-quality", share, "--blur", blur, "--margin", margin], seed)


# The storage experiment: the accuracy experiments' data at r = 0.1, at the default learning rate and
# at a tenth of it (updates ten times smaller against bf16's spacing).
STORAGES = ["f32", "bf16", "bf16-nearest"]
STORAGE_LRS = ["0.1", "0.01"]
STORAGE_SEEDS = ["7", "8", "9"]


def storage():
    for lr in STORAGE_LRS:
        for seed in STORAGE_SEEDS:
            for kind in STORAGES:
                train("storage-lr%s-%s-seed%s" % (lr, kind, seed), ["--sample-rate", "0.1", "--lr", lr, "--storage", kind], seed)


def scale():
    # 5M classes of d = 512 with SGD momentum need about 20 GiB: the most this 24 GiB machine holds.
    sizes = [int(c) for c in sys.argv[2:]] or [250_000, 500_000, 1_000_000, 2_000_000, 4_000_000, 5_000_000]
    for classes in sizes:
        # A fresh interpreter per run, so that ru_maxrss is this run's peak alone.
        probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True);"
                 "print(r.stdout); print('maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        cmd = [PFC, "bench", "--classes", str(classes), "--sample-rate", "0.1", "--dim", "512", "--batch", "256",
               "--steps", "5", "--reference-dir", "/nonexistent"]
        print("$", " ".join(cmd[1:]), flush=True)
        out = subprocess.run([sys.executable, "-c", probe] + cmd, capture_output=True, text=True, check=True).stdout
        row = next(l for l in out.splitlines() if l.startswith("| %d |" % classes))
        cells = [c.strip() for c in row.strip("|").split("|")]
        rss = int(next(l for l in out.splitlines() if l.startswith("maxrss_kib")).split()[1]) * 1024
        save("scale-%d" % classes, {"classes": classes, "step_s": float(cells[2].split()[0]),
                                     "images_per_s": float(cells[3]), "gemm_gflops": float(cells[4]),
                                     "peak_rss_bytes": rss, "command": "pfc " + " ".join(cmd[1:])})


def load(prefix):
    out = []
    for name in sorted(os.listdir(RESULTS)):
        if name.startswith(prefix):
            with open(os.path.join(RESULTS, name)) as f:
                out.append((name[:-5], json.load(f)))
    return out


def report():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load("rate-")
    if runs:
        runs.sort(key=lambda r: -r[1]["sample_rate"])
        print("| sample rate | TAR@FAR=1e-3 | TAR@FAR=1e-4 | top-1 | top-5 | last loss | training time |")
        print("|---|---|---|---|---|---|---|")
        for _, r in runs:
            print("| %.1f | %.2f%% | %.2f%% | %.2f%% | %.2f%% | %.3f | %.0f s |" % (
                r["sample_rate"], 100 * r["tar_far_1e-3"], 100 * r["tar_far_1e-4"], 100 * r["top1"], 100 * r["top5"],
                r["last_loss"], r["train_seconds"]))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        rates = ["%g" % round(r["sample_rate"], 4) for _, r in runs]
        for key, label in [("tar_far_1e-3", "TAR @ FAR 1e-3"), ("tar_far_1e-4", "TAR @ FAR 1e-4"), ("top1", "identification top-1")]:
            ax.plot(rates, [100 * r[key] for _, r in runs], marker="o", label=label)
        ax.set_xlabel("sample rate r"); ax.set_ylabel("%"); ax.set_title("Accuracy vs PartialFC sample rate (20k identities)")
        ax.set_ylim(0, 100); ax.legend(loc="lower left"); ax.grid(alpha=0.3); fig.tight_layout(); fig.savefig(os.path.join(PLOTS, "accuracy-vs-rate.png"), dpi=120)
        print()

    # The clean run without the filter is the accuracy experiment's r = 0.1 run (same data and settings).
    runs = load("noise-") + load("clean-") + load("rate-0.1")
    if runs:
        print("| data | filter | TAR@FAR=1e-3 | TAR@FAR=1e-4 | top-1 | top-5 |")
        print("|---|---|---|---|---|---|")
        for _, r in runs:
            data = "%.0f%% noisy labels, %.0f%% conflicts" % (100 * r["label_noise"], 100 * r["conflicts"]) if r["label_noise"] > 0 else "clean"
            print("| %s | %s | %.2f%% | %.2f%% | %.2f%% | %.2f%% |" % (
                data, ("%g" % round(r["filter"], 4)) if r["filter"] else "off", 100 * r["tar_far_1e-3"], 100 * r["tar_far_1e-4"], 100 * r["top1"], 100 * r["top5"]))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = ["%s\nfilter %s" % ("noisy" if r["label_noise"] > 0 else "clean", ("%g" % round(r["filter"], 4)) if r["filter"] else "off") for _, r in runs]
        xs = range(len(runs))
        ax.bar([x - 0.2 for x in xs], [100 * r["tar_far_1e-3"] for _, r in runs], width=0.4, label="TAR @ FAR 1e-3")
        ax.bar([x + 0.2 for x in xs], [100 * r["top1"] for _, r in runs], width=0.4, label="identification top-1")
        ax.set_xticks(list(xs)); ax.set_xticklabels(labels); ax.set_ylabel("%"); ax.set_ylim(0, 100); ax.legend(loc="lower left"); ax.grid(alpha=0.3, axis="y")
        ax.set_title("Label noise and conflicts, with and without the inter-class filter")
        fig.tight_layout(); fig.savefig(os.path.join(PLOTS, "noise-filter.png"), dpi=120)
        print()

    runs = load("quality-")
    if runs:
        quality_report(runs, plt)

    runs = load("storage-")
    if runs:
        storage_report(runs, plt)

    runs = load("scale-")
    if runs:
        runs.sort(key=lambda r: r[1]["classes"])
        print("| classes | step | images/s | GEMM GFLOP/s | peak memory |")
        print("|---|---|---|---|---|")
        for _, r in runs:
            print("| %d | %.3f s | %.0f | %.0f | %.2f GiB |" % (r["classes"], r["step_s"], r["images_per_s"], r["gemm_gflops"], r["peak_rss_bytes"] / 2**30))
        fig, ax1 = plt.subplots(figsize=(6, 3.5))
        cs = [r["classes"] / 1e6 for _, r in runs]
        ax1.plot(cs, [r["step_s"] for _, r in runs], marker="o", color="C0"); ax1.set_ylabel("step time (s)", color="C0")
        ax2 = ax1.twinx(); ax2.plot(cs, [r["peak_rss_bytes"] / 2**30 for _, r in runs], marker="s", color="C1")
        ax2.set_ylabel("peak memory (GiB)", color="C1"); ax1.set_xlabel("classes (millions), r = 0.1, d = 512, N = 256")
        ax1.set_title("Step time and memory vs class count (CPU, 2 cores)"); ax1.grid(alpha=0.3)
        fig.tight_layout(); fig.savefig(os.path.join(PLOTS, "scale.png"), dpi=120)


def seeds_against(rs, base, keys, is_base):
    """Table cells for runs of several seeds: each key's mean (lowest–highest), and against `base`
    (the baseline's runs by seed) the mean paired difference and the seeds on which these are ahead."""
    import statistics
    cells = ["%.2f%% (%.2f–%.2f)" % tuple(100 * f([r[k] for r in rs]) for f in (statistics.mean, min, max)) for k, _ in keys]
    if is_base:
        return cells, ["–"] * len(keys)
    deltas = []
    for k, _ in keys:
        diff = [r[k] - base[r["seed"]][k] for r in rs if r["seed"] in base]
        deltas.append("%+.2f pts, ahead on %d of %d" % (100 * statistics.mean(diff), sum(x > 0 for x in diff), len(diff)))
    return cells, deltas


def storage_report(runs, plt):
    import statistics
    pick = lambda lr, kind: [r for n, r in runs if n.startswith("storage-lr%s-%s-seed" % (lr, kind))]
    keys = [("tar_far_1e-3", "TAR@1e-3"), ("tar_far_1e-4", "TAR@1e-4"), ("top1", "top-1"), ("top5", "top-5")]
    print("Seeds %s, mean (lowest–highest); against f32 storage: the mean paired difference (same seed) and the seeds on which it is ahead:" % ", ".join(STORAGE_SEEDS))
    print()
    print("| head lr | storage | " + " | ".join(k[1] for k in keys) + " | last loss | " + " | ".join("Δ %s" % k[1] for k in keys) + " |")
    print("|---|---|" + "---|" * (2 * len(keys) + 1))
    for lr in STORAGE_LRS:
        base = {r["seed"]: r for r in pick(lr, "f32")}
        for kind in STORAGES:
            rs = pick(lr, kind)
            if not rs:
                continue
            cells, deltas = seeds_against(rs, base, keys, kind == "f32")
            loss = "%.3f" % statistics.mean(r["last_loss"] for r in rs)
            print("| %s | %s | %s | %s | %s |" % (lr, kind, " | ".join(cells), loss, " | ".join(deltas)))
    print()


def quality_report(runs, plt):
    import statistics
    margins = [m for m in ["arcface", "adaface", "curricular"] if any(r["margin"] == m for _, r in runs)]
    datas = [d for d in QUALITY if any(n.startswith("quality-%s-" % d) for n, _ in runs)]
    pick = lambda d, m: [r for n, r in runs if n.startswith("quality-%s-%s-seed" % (d, m))]
    describe = lambda d: "%s: %g%% blurred, blur up to %g" % ((d,) + tuple(float(x) * f for x, f in zip(QUALITY[d], (100, 1))))
    pct = lambda x: "%.2f%%" % (100 * x)

    print("Seed 7:")
    print()
    print("| data | margin | TAR@FAR=1e-3 | TAR@FAR=1e-4 | top-1 | top-5 | blurred pairs TAR@1e-3 | blurred pairs TAR@1e-4 | blurred queries top-1 | norm–quality correlation |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in datas:
        for m in margins:
            for r in pick(d, m):
                if r["seed"] == 7:
                    print("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %.3f |" % (
                        d, m, pct(r["tar_far_1e-3"]), pct(r["tar_far_1e-4"]), pct(r["top1"]), pct(r["top5"]),
                        pct(r["tar_far_1e-3_low_quality"]), pct(r["tar_far_1e-4_low_quality"]), pct(r["top1_low_quality"]),
                        r["norm_quality_correlation"]))
    print()
    keys = [("tar_far_1e-3", "TAR@1e-3"), ("tar_far_1e-4", "TAR@1e-4"), ("top1", "top-1"), ("tar_far_1e-3_low_quality", "blurred TAR@1e-3")]
    print("Seeds %s, mean (lowest–highest); against ArcFace: the mean paired difference and the seeds on which the margin is ahead:" % ", ".join(QUALITY_SEEDS))
    print()
    print("| data | margin | " + " | ".join(k[1] for k in keys) + " | " + " | ".join("Δ %s vs ArcFace" % k[1] for k in keys) + " |")
    print("|---|---|" + "---|" * (2 * len(keys)))
    for d in datas:
        base = {r["seed"]: r for r in pick(d, "arcface")}
        for m in margins:
            rs = pick(d, m)
            cells, deltas = seeds_against(rs, base, keys, m == "arcface")
            print("| %s | %s | %s | %s |" % (d, m, " | ".join(cells), " | ".join(deltas)))
    print()

    fig, axes = plt.subplots(1, len(datas), figsize=(5 * len(datas), 3.5), squeeze=False)
    for ax, d in zip(axes[0], datas):
        width = 0.8 / len(margins)
        for i, m in enumerate(margins):
            rs = pick(d, m)
            means = [100 * statistics.mean(r[k] for r in rs) for k, _ in keys]
            low = [mu - 100 * min(r[k] for r in rs) for mu, (k, _) in zip(means, keys)]
            high = [100 * max(r[k] for r in rs) - mu for mu, (k, _) in zip(means, keys)]
            ax.bar([x + (i - (len(margins) - 1) / 2) * width for x in range(len(keys))], means, width=width, yerr=[low, high], capsize=3, label=m)
        ax.set_xticks(range(len(keys))); ax.set_xticklabels([k[1] for k in keys], fontsize=8); ax.set_ylim(0, 100)
        ax.set_ylabel("%"); ax.set_title(describe(d), fontsize=9); ax.grid(alpha=0.3, axis="y"); ax.legend(loc="upper right", fontsize=8)
    fig.suptitle("Margins on data with blurred images (mean of %d seeds, bars: lowest–highest)" % len(QUALITY_SEEDS), fontsize=10)
    fig.tight_layout(); fig.savefig(os.path.join(PLOTS, "quality-margins.png"), dpi=120)
    print()


if __name__ == "__main__":
    {"accuracy": accuracy, "noise": noise, "quality": quality, "storage": storage, "scale": scale, "report": report}[sys.argv[1]]()
