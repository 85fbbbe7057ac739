"""PNG plots from the JSON results of the benchmarks.

    python -m imagen_fast.bench.plots bench-results/cpu_ops.json          # speedup per op and shape
    python -m imagen_fast.bench.plots bench-results/bench_model_cpu.json  # throughput per preset

Each writes a .png beside its JSON.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

OP_TITLES = {"gn": "group_norm_silu", "rms": "channel_rms_norm_silu", "attn": "attention", "thr": "dynamic_threshold",
             "step": "sampler_step"}
# (label, baseline candidates: the fastest of them is the one compared with)
SPEEDUPS = [("vs PyTorch eager", ("eager",)), ("vs torch.compile", ("compile",)),
            ("vs best SDPA backend", ("sdpa", "sdpa math", "sdpa flash", "sdpa efficient", "sdpa cudnn")),
            ("cuda vs triton", ("triton",))]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, plt, machine: dict, what: str, json_path: Path) -> Path:
    """Title with the machine and commit, written beside the JSON as .png."""
    fig.suptitle(f"imagen-fast {what} on {machine.get('gpu') or machine.get('cpu')} "
                 f"({machine.get('torch_threads')} threads), commit {machine.get('git_commit')} "
                 f"({Path(json_path).name})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(json_path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_speedups(json_path: Path) -> Path:
    """One panel per (op, pass): speedup of imagen-fast over each baseline, per case."""
    plt = _pyplot()
    data = json.loads(Path(json_path).read_text())
    records = data["raw"]["cases"]
    panels = []
    for op in OP_TITLES:
        for mode in ("fwd", "fwd+bwd"):
            rows = [r for r in records if (r["op"], r["mode"]) == (op, mode)]
            if rows:
                panels.append((op, mode, rows))
    width = max(8.0, 0.28 * max(len(rows) for _, _, rows in panels) + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.4 * len(panels)), squeeze=False)
    for ax, (op, mode, rows) in zip(axes[:, 0], panels):
        series = []
        for label, base in SPEEDUPS:
            vals = []
            for r in rows:
                t = {k: v["median_ms"] for k, v in r["timings"].items()}
                ours = t.get("cuda") if label.startswith("cuda") else t.get("imagen-fast")
                present = [t[b] for b in base if b in t]
                vals.append(min(present) / ours if present and ours else math.nan)
            if any(not math.isnan(v) for v in vals):
                series.append((label, vals))
        n = max(1, len(series))
        bar = 0.8 / n
        for j, (label, vals) in enumerate(series):
            ax.bar([i - 0.4 + bar * (j + 0.5) for i in range(len(rows))], vals, width=bar, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{'x'.join(map(str, r['shape']))} {r['dtype']} {r['layout']}"
                            + (" mask" if r.get("masked") else "") for r in rows],
                           rotation=70, ha="right", fontsize=6)
        ax.set_ylabel("speedup (x)")
        ax.set_title(f"{OP_TITLES[op]} {mode}", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, plt, data["machine"], "op speedups", json_path)


def plot_model(json_path: Path) -> Path:
    """Images/s per preset and mode (train step, sampling per step, sampling end to end),
    imagen-fast beside imagen-pytorch where it was measured."""
    plt = _pyplot()
    data = json.loads(Path(json_path).read_text())
    runs = data["raw"]["throughput"]
    modes = [m for m in ("train", "sample", "sample e2e") if any(r["mode"] == m for r in runs)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in runs if r["mode"] == mode]
        labels = [f"{r['preset']}\n({r['library']})" for r in rows]
        colors = ["tab:blue" if r["library"] == "imagen-fast" else "tab:gray" for r in rows]
        ax.bar(range(len(rows)), [r["images_per_s"] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("images/s")
        ax.set_title({"train": "training step", "sample": "sampling, per denoising step",
                      "sample e2e": "sampling, end to end"}[mode], fontsize=9)
    return _save(fig, plt, data["machine"], "model throughput", json_path)


def plot(json_path: Path) -> Path:
    raw = json.loads(Path(json_path).read_text()).get("raw", {})
    return plot_model(json_path) if "throughput" in raw else plot_speedups(json_path)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m imagen_fast.bench.plots RESULTS.json [...]")
    for arg in sys.argv[1:]:
        print(plot(Path(arg)))
