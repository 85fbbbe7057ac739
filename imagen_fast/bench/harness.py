"""Timing, machine description and result files shared by the benchmarks (CPU and GPU).

Rules the numbers follow: candidates compared in one table run in the same process,
interleaved round by round in a shuffled order (so background load hits all of them
alike); each round times a batch of calls, with CUDA events around the batch on a GPU
and the wall clock on a CPU; the table reports the median over rounds with the
10th/90th percentiles; inputs rotate over several copies whose total size exceeds the
last-level cache (CPU) or 4x the L2 cache (GPU), so no call finds its data already
cached. The roofline denominators (copy bandwidth, matmul rate) are measured by the
same process at start.
"""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

# Results go to --results-dir, by default ./bench-results, never into the installed
# package; a checkout's committed results (benchmarks/results/) only when named.
from imagen_fast.bench import DEFAULT_RESULTS

ROTATE_BYTES = 256 << 20        # rotate inputs over at least this many bytes


def set_allocator_env() -> None:
    """Fixed allocator and thread settings for timing, set before the process allocates:
    glibc returns big blocks to the OS and page-faults them back in on every call unless
    its mmap/trim thresholds are high, and OpenMP's thread count must be fixed at start.
    The benchmark re-executes itself with them when they are missing (call this first
    thing in a benchmark's main, never at import)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    threads = os.environ.get("IMAGEN_FAST_BENCH_THREADS", str(os.cpu_count() or 1))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4294967296",
               MALLOC_TRIM_THRESHOLD_="68719476736", MALLOC_TOP_PAD_="1073741824",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", threads))
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    rounds: int

    def as_dict(self):
        return asdict(self)


def rotate_bytes(device: torch.device = torch.device("cpu")) -> int:
    """Bytes the rotated inputs of one call must span: more than any cache level."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        return max(ROTATE_BYTES, 4 * l2)
    return ROTATE_BYTES


def copies_for(nbytes: int, minimum: int = 2, maximum: int = 64,
               device: torch.device = torch.device("cpu")) -> int:
    """How many input copies rotate so their total exceeds ``rotate_bytes(device)``."""
    return max(minimum, min(maximum, -(-rotate_bytes(device) // max(1, nbytes))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Times a batch of calls: CUDA events on a GPU (device time of the stream, launch
    gaps included), perf_counter with a synchronise on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def time(self, fn: Callable[[int], object], first: int, k: int) -> float:
        """ms per call of fn(first), ..., fn(first + k - 1)."""
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            for i in range(first, first + k):
                fn(i)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / k
        t0 = time.perf_counter()
        for i in range(first, first + k):
            fn(i)
        return (time.perf_counter() - t0) / k * 1e3


def compare(candidates: Dict[str, Callable[[int], object]], *, rounds: int = 21,
            min_round_s: float = 0.02, warmup: int = 3,
            device: torch.device = torch.device("cpu")) -> Dict[str, Timing]:
    """Time each candidate; a candidate is ``fn(i)`` running call number i (which input
    copy it uses is up to it). Returns per-candidate timings per call."""
    names = list(candidates)
    clock = _Clock(device)
    inner = {}
    for name in names:                      # warm up and size the inner loops
        fn = candidates[name]
        for i in range(warmup):
            fn(i)
        _sync(device)
        one = max(clock.time(fn, warmup, 1) * 1e-3, 1e-7)
        inner[name] = max(1, int(min_round_s / one))
    samples: Dict[str, List[float]] = {n: [] for n in names}
    counter = 0
    rng = random.Random(0)
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            fn, k = candidates[name], inner[name]
            _sync(device)
            samples[name].append(clock.time(fn, counter, k))
            counter += k
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=10)
        out[name] = Timing(statistics.median(s), q[0], q[-1], len(s))
    return out


def measure_copy_bandwidth(device: torch.device = torch.device("cpu"), nbytes: Optional[int] = None,
                           rounds: int = 15) -> float:
    """GB/s of dst.copy_(src) over buffers far larger than the cache (read + write):
    512 MiB on a CPU, 1 GiB on a GPU."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (512 << 20))
    n = nbytes // 4
    src = [torch.rand(n, device=device) for _ in range(2)]
    dst = [torch.empty(n, device=device) for _ in range(2)]
    t = compare({"copy": lambda i: dst[i % 2].copy_(src[(i + 1) % 2])}, rounds=rounds,
                min_round_s=0.05, device=device)["copy"]
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def measure_matmul_rate(device: torch.device = torch.device("cpu"), n: Optional[int] = None,
                        dtype: torch.dtype = torch.float32, rounds: int = 9) -> float:
    """GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) in ``dtype`` (n = 2048 on a CPU,
    8192 on a GPU)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = compare({"mm": lambda i: torch.mm(a, b, out=out)}, rounds=rounds, min_round_s=0.05,
                device=device)["mm"]
    return 2 * n ** 3 / (t.median_ms * 1e-3) / 1e9


def load_warning(load_averages: Sequence[float], cpu_count: Optional[int] = None) -> Optional[str]:
    """A warning for the results when the 1-minute load average exceeded the core count
    at any of the given moments: timings are then dominated by scheduling (threads of
    a parallel region wait for a descheduled one), ratios included."""
    cores = cpu_count or os.cpu_count() or 1
    worst = max(load_averages, default=0.0)
    if worst <= cores:
        return None
    return (f"LOADED MACHINE: load average up to {worst:.1f} on {cores} cores while timing; "
            "these numbers measure the scheduler as much as the code (rerun on a quiet machine)")


def fresh_compile(fn: Callable) -> Callable:
    """torch.compile(fn) with empty dynamo caches: each benchmarked shape gets its own
    static-shape graph, and the recompile limit (8 per function) never turns a later
    shape's "compile" candidate silently back into eager code."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def progress(items: Sequence, desc: str):
    """A progress bar over the benchmark list (tqdm, to stderr), or the plain list."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="case", dynamic_ncols=True, mininterval=1.0)


def _git_commit() -> str:
    """The commit of the checkout this package runs from, or "unknown" for an installed
    package (which may sit in another repository's .venv: that repository's commit would
    be a wrong tag)."""
    checkout = Path(__file__).resolve().parents[2]
    try:
        def git(*a):
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=checkout,
                                  check=True).stdout.strip()
        if Path(git("rev-parse", "--show-toplevel")).resolve() != checkout:
            return "unknown"
        return git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - not installed or broken: reported as None
        return None


def machine_info(device: torch.device = torch.device("cpu")) -> dict:
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "imagen_fast": _version("imagen_fast"),
        "git_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    try:
        import imagen_fast._C as C
        info["imagen_fast_build"] = C.build_info()
    except ImportError:
        info["imagen_fast_build"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_arch=f"sm_{p.major}{p.minor}", gpu_sms=p.multi_processor_count,
                    gpu_l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                    gpu_memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    driver=_nvidia_driver())
    return info


def _nvidia_driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass
class Table:
    """Rows of results plus the header, written as JSON and markdown."""
    title: str
    columns: Sequence[str]
    rows: List[list] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def add(self, *row):
        self.rows.append(list(row))

    def markdown(self) -> str:
        fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def add_results_arg(ap) -> None:
    """The --results-dir option every benchmark takes (one definition, one default)."""
    ap.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, metavar="DIR",
                    help=f"directory for the results (default ./{DEFAULT_RESULTS}; a checkout's "
                         "committed results: benchmarks/results)")


def write_results(results_dir: Path, name: str, machine: dict, tables: Sequence[Table], raw: dict) -> Path:
    """<results_dir>/<name>.json (machine, tables, raw numbers) and <name>.md."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "tables": [
        {"title": t.title, "columns": list(t.columns), "rows": t.rows, "notes": t.notes}
        for t in tables], "raw": raw}
    json_path = results_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=1))
    md = [f"# {name}", "", "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()
                                                     if k != "imagen_fast_build"), ""]
    md += [t.markdown() for t in tables]
    (results_dir / f"{name}.md").write_text("\n".join(md))
    return json_path
