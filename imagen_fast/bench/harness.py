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
        q = statistics.quantiles(s, n=10, method="inclusive")   # within the samples, also for few rounds
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


# ------------------------------------------------------------------ busy machine
# A result measured while other work ran is not a result: torch's OpenMP threads wait
# for a descheduled one, and an interleaved comparison on a loaded machine punishes
# whichever side uses more threads. Every benchmark watches its run (Watch) and
# write_results writes a busy run only as a draft under results/drafts/ (git-ignored,
# never quoted). The limits:
QUIET_OTHERS_CPU = 0.10    # others' share of all cores' time during the run (incl. steal)
QUIET_COPY_DRIFT = 0.15    # relative drop of the copy bandwidth from start to end
QUIET_EXTRA_LOAD = 0.5     # 1-min load average above this process's threads, per core
DRAFTS = "drafts"           # a busy run's results: <results dir>/drafts/


def cpu_times() -> Optional[tuple]:
    """(busy seconds of all CPUs incl. steal, seconds used by this process and its
    waited-for children), or None where /proc/stat does not exist."""
    import resource
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    busy = sum(ticks[:3]) + sum(ticks[5:8])
    hz = os.sysconf("SC_CLK_TCK")
    own = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return busy / hz, own


def busy_reasons(before: dict, after: dict, cores: int, threads: int) -> List[str]:
    """Why a run between two probes (dicts with time_s, load1, copy_gbs and cpu = the
    cpu_times() pair or None) was not on a quiet machine; [] when it was."""
    why = []
    if before.get("copy_gbs") and after.get("copy_gbs"):
        # Only a drop says that something took the memory bus by the end. A rise is the
        # start probe's memory being cold (a fresh process: measured 24-28 -> 28-40 GB/s
        # over long quiet runs here); contention at the start shows in the load average
        # and the other processes' CPU time.
        a, b = before["copy_gbs"], after["copy_gbs"]
        drop = (a - b) / a
        if drop > QUIET_COPY_DRIFT:
            why.append(f"copy bandwidth {a:.1f} -> {b:.1f} GB/s ({100 * drop:.0f}% lower at the end; "
                       f"limit {100 * QUIET_COPY_DRIFT:.0f}%)")
    limit = threads + QUIET_EXTRA_LOAD * cores
    worst = max(before["load1"], after["load1"])
    if worst > limit:
        why.append(f"load average {worst:.2f} on {cores} cores with {threads} benchmark threads "
                   f"(limit {limit:.2f})")
    wall = after["time_s"] - before["time_s"]
    if before.get("cpu") and after.get("cpu") and wall > 0:
        others = (after["cpu"][0] - before["cpu"][0]) - (after["cpu"][1] - before["cpu"][1])
        share = others / (wall * cores)
        if share > QUIET_OTHERS_CPU:
            why.append(f"other processes took {100 * share:.0f}% of the {cores} cores' time "
                       f"(limit {100 * QUIET_OTHERS_CPU:.0f}%)")
    return why


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


class Watch:
    """Watches one benchmark run for other work on the machine: a probe (copy bandwidth,
    load average, CPU time of everything vs this process) at start() and at stop().
    ``fields()`` goes into the machine description; write_results reads its "busy"."""

    def __init__(self, device: torch.device = torch.device("cpu"), threads: Optional[int] = None,
                 measure_copy: Callable[[torch.device], float] = None):
        self.device = device
        self.cores = os.cpu_count() or 1
        self.threads = threads or torch.get_num_threads()
        self._copy = measure_copy or measure_copy_bandwidth
        self.before: Optional[dict] = None
        self.after: Optional[dict] = None

    def _probe(self) -> dict:
        copy = self._copy(self.device)
        return {"time_s": time.time(), "load1": os.getloadavg()[0], "copy_gbs": copy, "cpu": cpu_times()}

    def start(self) -> dict:
        self.before = self._probe()
        return self.before

    def stop(self) -> List[str]:
        self.after = self._probe()
        return self.reasons()

    def reasons(self) -> List[str]:
        if self.before is None or self.after is None:
            raise RuntimeError("Watch: call start() before the run and stop() after it")
        return busy_reasons(self.before, self.after, self.cores, self.threads)

    def fields(self) -> dict:
        """copy_gbs, copy_gbs_end, load_average(_end), others' CPU share and the verdict."""
        b, a = self.before, self.after
        out = {"copy_gbs": round(b["copy_gbs"], 2), "copy_gbs_end": round(a["copy_gbs"], 2),
               "load_average_start": round(b["load1"], 2), "load_average_end": [round(v, 2) for v in os.getloadavg()],
               "busy": self.reasons()}
        if b["cpu"] and a["cpu"] and a["time_s"] > b["time_s"]:
            others = (a["cpu"][0] - b["cpu"][0]) - (a["cpu"][1] - b["cpu"][1])
            out["others_cpu_share"] = round(others / ((a["time_s"] - b["time_s"]) * self.cores), 3)
        return out


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
    """Writes <results_dir>/<name>.json and .md. ``machine["busy"]`` (Watch.fields()) must
    say whether the machine was quiet: when it lists reasons, the run goes to
    <results_dir>/drafts/<name>.* instead, flagged, and is never a result."""
    if "busy" not in machine:
        raise ValueError("write_results: machine['busy'] is missing: watch the run with harness.Watch "
                         "and merge its fields() into the machine description")
    busy = list(machine["busy"])
    out_dir = Path(results_dir) / DRAFTS if busy else Path(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "tables": [
        {"title": t.title, "columns": list(t.columns), "rows": t.rows, "notes": t.notes}
        for t in tables], "raw": raw}
    if busy:
        payload["draft"] = "measured on a busy machine: not a result, never quote it"
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=1))
    md = [f"# {name}", ""]
    if busy:
        md += ["**DRAFT: measured on a busy machine; not a result, never quote it.** " + "; ".join(busy), ""]
    md += ["Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items() if k != "imagen_fast_build"), ""]
    md += [t.markdown() for t in tables]
    (out_dir / f"{name}.md").write_text("\n".join(md))
    if busy:
        import sys
        print(f"BUSY MACHINE: {'; '.join(busy)}. Wrote a draft to {json_path}, not a result "
              "(rerun on a quiet machine).", file=sys.stderr)
    return json_path
