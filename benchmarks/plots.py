"""PNG plots from the JSON results of the benchmarks (speedup per op and shape).

    python -m benchmarks.plots benchmarks/results/cpu_ops.json   # writes cpu_ops.png beside it
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_speedups(json_path: Path) -> Path:
    """One panel per table: speedup vs eager and vs torch.compile for each row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    tables = [t for t in data["tables"] if "x eager" in t["columns"]]
    fig, axes = plt.subplots(len(tables), 1, figsize=(10, 3.2 * len(tables)), squeeze=False)
    for ax, table in zip(axes[:, 0], tables):
        cols = table["columns"]
        labels = [" ".join(str(r[cols.index(c)]) for c in ("shape", "dtype", "layout")) for r in table["rows"]]
        x = range(len(labels))
        eager = [r[cols.index("x eager")] for r in table["rows"]]
        comp = [r[cols.index("x compile")] for r in table["rows"]]
        ax.bar([i - 0.2 for i in x], eager, width=0.4, label="vs PyTorch eager")
        ax.bar([i + 0.2 for i in x], comp, width=0.4, label="vs torch.compile")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup (x)")
        ax.set_title(table["title"], fontsize=9)
        ax.legend(fontsize=7)
    m = data["machine"]
    fig.suptitle(f"imagen-fast {Path(json_path).stem} on {m.get('gpu') or m.get('cpu')} "
                 f"(commit {m.get('git_commit')})", fontsize=10)
    fig.tight_layout()
    out = Path(json_path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:] or [str(Path(__file__).parent / "results" / "cpu_ops.json")]:
        print(plot_speedups(Path(arg)))
