"""Ahead-of-time compile audit of every Triton kernel for A100 (sm_80) and H100 (sm_90a),
and of csrc/cuda from nvcc's ptxas report, on a machine with no GPU.

Triton's interpreter (how CI runs the kernels) accepts programs the GPU compiler
rejects, and shows nothing of registers, spills or shared memory. This module compiles
what a GPU would compile:

1. capture: the package's own host wrappers (imagen_fast/kernels/triton, the functions
   registered with the dispatcher) run over the preset shape table
   (imagen_fast/bench/shapes.py: every preset, batches, both layouts, fp32/fp16/bf16, with and
   without masks, FiLM, guidance and noise) on meta tensors, with the launcher replaced
   by a recorder: every ``kernel[grid](...)`` launch is bound by Triton's own binder
   into (signature, constexprs, specialisation attributes, num_warps, num_stages),
   exactly as a GPU launch would be, and not run. The SM count is the target's (plans
   that split work depend on it). The autotuner (``_common.pick_config``) launches
   every candidate once, then its default. Each launch gets a role:
     fixed      launched with no tuner involved
     default    what a tuned op runs untuned (and what the tuner falls back to)
     candidate  only tried by the autotuner
2. compile: each distinct specialisation with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", cap, 32))``; registers, spill stores/loads and stack from
   ptxas's own report (``-v``, the ptxas inside the triton wheel), shared memory from
   the kernel metadata against the per-block limit of the card. Results are cached per
   (kernel source hash without line numbers, specialisation, target, triton version) under
   ``~/.cache/imagen_fast/gpu_compile`` (``IMAGEN_FAST_CACHE`` moves it).
3. csrc/cuda: every .cu compiled by nvcc for sm_80 and sm_90a with ``-Xptxas -v``.

Rules the audit enforces (``--check`` exits 1 otherwise): every specialisation
compiles, fits the shared memory of the card and, unless it is only an autotuner
candidate, does not spill.

    python -m benchmarks.gpu_compile                   # full audit -> results/gpu_compile.{md,json}
    python -m benchmarks.gpu_compile --subset ci --check --no-report   # what the test runs
    imagen-fast bench gpu-compile  |  make gpu-compile
    python -m benchmarks.gpu_compile --device-run      # on a CUDA GPU: load and launch each
                                                       # config once, registers from the driver
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `imagen_fast` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_compile_report import (ROLES, compact, cuda_problems, markdown,  # noqa: E402
                                           not_compiled, problems, summary)

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = ("float32", "float16", "bfloat16")
GN_BATCHES = (1, 2, 8, 16, 64, 128)      # the shape table's 1/8/64 and guided sampling's 2B
ATTN_BATCHES = (1, 2)                     # the batch only changes the grid
IMAGE_BATCHES = (1, 2, 4, 8, 16, 64)


@dataclass(frozen=True)
class Target:
    cap: int
    card: str
    arch: str
    sms: int
    smem_per_block: int      # bytes of shared memory one block may use (opt-in maximum)


TARGETS: Dict[int, Target] = {
    80: Target(80, "A100", "sm_80", 108, 166912),
    90: Target(90, "H100", "sm_90a", 132, 232448),
}


# ---------------------------------------------------------------------- capture
@dataclass
class Spec:
    """One distinct compilation: a kernel and everything its binary depends on."""
    kernel: str                 # module.function
    fn: object = field(repr=False, compare=False)
    signature: Dict[str, str] = field(repr=False)
    constexprs: Dict[tuple, object] = field(repr=False)
    attrs: Dict[tuple, list] = field(repr=False)
    num_warps: int = 4
    num_stages: int = 3
    roles: set = field(default_factory=set)
    cases: List[str] = field(default_factory=list)     # the first launches that made it
    group: str = ""                                     # the first shape-table case that did

    @property
    def ident(self) -> str:
        """Stable text identity (no source hash): the same launch from the same code."""
        return json.dumps([self.kernel, sorted(self.signature.items()), self.config,
                           sorted((str(k), v) for k, v in self.attrs.items())])

    @property
    def config(self) -> str:
        """What chose this binary, readable: dtypes, constexprs, specialised ints, warps."""
        names = self.fn.arg_names
        parts = []
        ptrs = [v for v in self.signature.values() if v.startswith("*")]
        if ptrs:
            parts.append(ptrs[0][1:])
        for path, v in sorted(self.constexprs.items()):
            name = names[path[0]]
            if self.signature.get(name) == "constexpr" and not _is_declared_constexpr(self.fn, name):
                parts.append(f"{name}=={_short(v)}")     # an int argument equal to 1
            else:
                parts.append(f"{name}={_short(v)}")
        divisible = [names[p[0]] for p, a in sorted(self.attrs.items())
                     if a and not self.signature[names[p[0]]].startswith("*")]
        if divisible:
            parts.append("16|" + ",".join(divisible))
        parts.append(f"w{self.num_warps}s{self.num_stages}")
        return " ".join(parts)

    @property
    def role(self) -> str:
        return next(r for r in ROLES if r in self.roles)


def _short(v) -> str:
    s = str(v)
    if s.startswith("fp") or s.startswith("bf"):
        return s
    if s in ("True", "False"):
        return "1" if s == "True" else "0"
    return s


def _is_declared_constexpr(fn, name: str) -> bool:
    return any(p.name == name and p.is_constexpr for p in fn.params)


class _Ptr:
    """A meta tensor as Triton's binder sees a CUDA one: its dtype and an address that
    is aligned as the caching allocator's (512 B) plus the view's offset."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = (1 << 30) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


class Recorder:
    """Replaces JITFunction.run (and the autotuner) while active: launches are bound by
    Triton's binder for a CUDA target and recorded, never run."""

    def __init__(self, target: Target):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        self.target = target
        self.backend = make_backend(GPUTarget("cuda", target.cap, 32))
        self.specs: Dict[str, Spec] = {}
        self.role = "fixed"
        self.case = ""
        self.group = ""
        self._binders: Dict[int, Callable] = {}
        self._seen: Dict[tuple, Spec] = {}
        self.launches = 0

    def record(self, fn, args, kwargs):
        import torch
        binder = self._binders.get(id(fn))
        if binder is None:
            from triton.runtime.jit import create_function_from_signature
            binder = create_function_from_signature(fn.signature, fn.params, self.backend)
            self._binders[id(fn)] = binder
        args = [_Ptr(a) if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: _Ptr(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        bound, specialization, opts = binder(*args, **kwargs)
        self.launches += 1
        quick = (id(fn), repr(specialization), repr(sorted(kwargs.items())) if kwargs else "")
        got = self._seen.get(quick)
        if got is None:
            options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound,
                                                                  specialization, opts)
            s = Spec(f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}", fn, signature,
                     constexprs, attrs, options.num_warps, options.num_stages)
            s.group = self.group
            got = self._seen[quick] = self.specs.setdefault(s.ident, s)
        got.roles.add(self.role)
        if len(got.cases) < 3 and self.case not in got.cases:
            got.cases.append(self.case)

    def pick_config(self, name, key, device, candidates, run, default):
        self.role = "candidate"
        for cfg in candidates:
            run(cfg)
        self.role = "default"
        return default

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.jit import JITFunction

        from imagen_fast.kernels.triton import _common as cm
        rec = self

        def run(self, *args, grid, warmup, **kwargs):
            rec.record(self, args, kwargs)

        saved = (JITFunction.run, cm.sm_count, cm.pick_config)
        JITFunction.run = run
        cm.sm_count = lambda device: rec.target.sms
        cm.pick_config = self.pick_config
        try:
            yield self
        finally:
            JITFunction.run, cm.sm_count, cm.pick_config = saved

    def call(self, case: str, fn: Callable, *args):
        self.case, self.role = case, "fixed"
        return fn(*args)


def _require_compiler_mode():
    """The kernels must be real JITFunctions (TRITON_INTERPRET unset before they load)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile audit needs TRITON_INTERPRET unset (it is set): run it "
                           "as `python -m benchmarks.gpu_compile`, which re-executes itself")
    from triton.runtime.jit import JITFunction

    from imagen_fast.kernels.triton import attention
    if not isinstance(attention._attn_fwd_kernel, JITFunction):
        raise RuntimeError("imagen_fast's triton kernels were loaded under TRITON_INTERPRET=1")


# ---------------------------------------------------------------- the launches
@dataclass(frozen=True)
class Scope:
    """How much of the shape table to capture."""
    presets: Tuple[str, ...]
    text_lens: Tuple[int, ...]
    gn_batches: Tuple[int, ...]
    attn_batches: Tuple[int, ...]
    image_batches: Tuple[int, ...]
    dtypes: Tuple[str, ...] = DTYPES


def full_scope() -> Scope:
    from imagen_fast.bench.shapes import TEXT_LENS
    from imagen_fast.models import PRESETS
    return Scope(tuple(PRESETS), tuple(TEXT_LENS), GN_BATCHES, ATTN_BATCHES, IMAGE_BATCHES)


def _meta(shape, dtype, channels_last=False):
    import torch
    t = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last and t.ndim == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _dt(name):
    import torch
    return getattr(torch, name)


def _norm_maps(scope: Scope):
    """Distinct (C, H, W, groups, activation, FiLM) of the presets' norm calls, as the
    models make them (FiLM'd and plain calls both occur)."""
    from imagen_fast.bench.shapes import gn_shapes
    seen = {}
    for call in gn_shapes(scope.presets):
        seen.setdefault((call.c, call.h, call.w, call.groups, call.activation, call.film), None)
    return list(seen)


def cases(scope: Scope) -> Iterator[Tuple[str, Callable[[Recorder], None]]]:
    """(label, run(recorder)) for every launch of the shape table: each calls a triton
    host wrapper the way the ops layer does (parameters in float32, layouts as given)."""
    import torch

    from imagen_fast.kernels.triton import attention as tattn
    from imagen_fast.kernels.triton import group_norm as tgn
    from imagen_fast.kernels.triton import rms_norm as trms
    from imagen_fast.kernels.triton import threshold as tthr
    f32 = torch.float32
    needs = (True, True, True, True, True)
    for (c, h, w, groups, act, film), n, dn, cl in itertools.product(
            _norm_maps(scope), scope.gn_batches, scope.dtypes, (False, True)):
        label = (f"gn {n}x{c}x{h}x{w} g{groups} {dn} {'cl' if cl else 'nchw'} "
                 f"{'film ' if film else ''}{act}")

        def gn(rec, n=n, c=c, h=h, w=w, groups=groups, dn=dn, cl=cl, film=film, act=act,
               label=label):
            x = _meta((n, c, h, w), _dt(dn), cl)
            wt, b = _meta((c,), f32), _meta((c,), f32)
            sc = _meta((n, c), f32) if film else None
            sh = _meta((n, c), f32) if film else None
            y, mean, rstd = rec.call(label + " fwd", tgn.group_norm_silu_fwd, x, groups, wt, b,
                                     1e-5, sc, sh, act)
            rec.call(label + " bwd", tgn.group_norm_silu_bwd, torch.empty_like(y), x, mean, rstd,
                     groups, wt, b, sc, sh, act, needs)
            if n in scope.gn_batches[:2]:   # channel RMS norm: the same feature maps
                rl = label.replace("gn", "rms", 1)
                y, r = rec.call(rl + " fwd", trms.channel_rms_norm_silu_fwd, x, wt, 1e-8, sc, sh, act)
                rec.call(rl + " bwd", trms.channel_rms_norm_silu_bwd, torch.empty_like(y), x, r, wt,
                         1e-8, sc, sh, act, needs[:4])
        yield label, gn
    from imagen_fast.bench.shapes import attn_shapes
    seen = {}
    for a in attn_shapes(scope.presets, scope.text_lens):
        seen.setdefault((a.heads, a.lq, a.lk, a.d), None)
    for heads, lq, lk, d in seen:
        for b in scope.attn_batches:
            for dn in scope.dtypes:
                for masked in (True, False):
                    label = f"attn {b}x{heads}x{lq}x{lk}x{d} {dn} {'mask' if masked else 'no mask'}"

                    def attn(rec, b=b, heads=heads, lq=lq, lk=lk, d=d, dn=dn, masked=masked,
                             label=label):
                        q = _meta((b, heads, lq, d), _dt(dn))
                        k, v = _meta((b, heads, lk, d), _dt(dn)), _meta((b, heads, lk, d), _dt(dn))
                        mask = _meta((b, lk), torch.bool) if masked else None
                        out, lse = rec.call(label + " fwd", tattn.attention_fwd, q, k, v, mask,
                                            d ** -0.5)
                        rec.call(label + " bwd", tattn.attention_bwd, torch.empty_like(out), q, k,
                                 v, mask, out, lse, d ** -0.5)
                    yield label, attn
    from imagen_fast.bench.shapes import image_shape
    res = sorted({image_shape(p).h for p in scope.presets})
    for r in res:
        for n in scope.image_batches:
            for dn in scope.dtypes:
                for cl in (False, True):
                    label = f"image {n}x3x{r}x{r} {dn} {'cl' if cl else 'nchw'}"

                    def image(rec, n=n, r=r, dn=dn, cl=cl, label=label):
                        z = _meta((n, 3, r, r), _dt(dn), cl)
                        rec.call(label + " dynamic_threshold", tthr.dynamic_threshold, z, 0.995,
                                 1.0, float("inf"))
                        coefs = _meta((n, 5), torch.float64)
                        for thr in ("dynamic", "static", "none"):
                            for guided in (True, False):
                                for noise in (True, False):
                                    rec.call(f"{label} sampler_step {thr}"
                                             f"{' guided' if guided else ''}{' noise' if noise else ''}",
                                             tthr.sampler_step, z, torch.empty_like(z),
                                             torch.empty_like(z) if guided else None, 5.0, coefs,
                                             torch.empty_like(z) if noise else None, thr, 0.995, 1.0)
                    yield label, image


def capture(target: Target, scope: Scope, groups: Optional[Iterable[str]] = None) -> List[Spec]:
    """Every distinct specialisation the host wrappers launch over the scope (only the
    shape-table cases named in ``groups`` when given)."""
    _require_compiler_mode()
    rec = Recorder(target)
    wanted = None if groups is None else set(groups)
    with rec.active():
        for label, run in cases(scope):
            if wanted is None or label in wanted:
                rec.group = label
                run(rec)
    return list(rec.specs.values())


# ---------------------------------------------------------------------- compile
_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> Dict[str, int]:
    """Registers, stack and spill bytes of the (single) entry function in a ptxas -v log."""
    props = _PTXAS_PROPS.search(log)
    regs = _PTXAS_REGS.search(log)
    if not (props and regs):
        raise ValueError(f"no ptxas resource report in: {log[-400:]!r}")
    stack, stores, loads = (int(v) for v in props.groups())
    return dict(regs=int(regs.group(1)), stack=stack, spill_stores=stores, spill_loads=loads)


def error_line(e: BaseException) -> str:
    """The line of a compile error that says what is wrong (not the source excerpt):
    the innermost Triton error message, or ptxas's own error line."""
    msgs = []
    cur = e
    while cur is not None:
        msg = getattr(cur, "error_message", None)
        if msg:
            msgs.append(str(msg))
        cur = cur.__cause__ or cur.__context__
    text = msgs[-1] if msgs else str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "ptxas" in ln and "error" in ln and ": " in ln:
            return ln[:300]
    for ln in lines:
        if not ln.startswith("at "):
            return ln[:300]
    return f"{type(e).__name__}"


def cache_dir() -> Path:
    root = os.environ.get("IMAGEN_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "imagen_fast")
    return Path(root) / "gpu_compile"


def _kernel_jit_functions() -> List:
    """Every @triton.jit function of the package's kernel modules (kernels and helpers)."""
    from triton.runtime.jit import JITFunction

    from imagen_fast.kernels.triton import _common, attention, group_norm, rms_norm, threshold
    return [f for mod in (_common, attention, group_norm, rms_norm, threshold)
            for f in vars(mod).values() if isinstance(f, JITFunction)]


_SOURCE_KEYS: Dict[int, str] = {}


def source_key(fn) -> str:
    """Triton's hash of a kernel (its source, every jit function it calls, the constexpr
    globals it reads) with the line numbers left out. Triton's own hash includes where
    each function starts in its file, so an import added above a kernel would discard
    its cached audit; line numbers only reach the binary's debug locations, never its
    registers, spills or shared memory."""
    got = _SOURCE_KEYS.get(id(fn))
    if got is None:
        fns = _kernel_jit_functions()
        saved = [(f, f.starting_line_number, f.hash) for f in fns]
        try:
            for f in fns:
                f.starting_line_number, f.hash = 0, None
            got = _SOURCE_KEYS[id(fn)] = fn.cache_key
        finally:
            for f, line, h in saved:
                f.starting_line_number, f.hash = line, h
    return got


def _cache_key(spec: Spec, target: Target) -> str:
    import triton
    blob = json.dumps([source_key(spec.fn), spec.ident, target.cap, triton.__version__])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def compile_spec(spec: Spec, target: Target, use_cache: bool = True,
                 cached_only: bool = False) -> Optional[Dict]:
    """Compile one specialisation for one target: the ptxas report, or the error
    (``cached_only``: an earlier run's result, None when there is none)."""
    key = _cache_key(spec, target)
    path = cache_dir() / key[:2] / f"{key}.json"
    if use_cache and path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    if cached_only:
        return None
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    t0 = time.perf_counter()
    out = io.StringIO()
    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log = True      # ptxas -v printed to stdout, captured here
    knobs.compilation.always_compile = True  # a triton cache hit would skip ptxas
    try:
        with contextlib.redirect_stdout(out):
            k = triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs),
                               target=GPUTarget("cuda", target.cap, 32),
                               options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
        res = dict(ok=True, error="", shared=int(k.metadata.shared), **parse_ptxas(out.getvalue()))
    except Exception as e:  # noqa: BLE001 - any compiler failure is a result to report
        res = dict(ok=False, error=error_line(e), shared=0, regs=0, stack=0, spill_stores=0,
                   spill_loads=0)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    res["seconds"] = round(time.perf_counter() - t0, 3)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, path)
    return res


_POOL_SPECS: List[Tuple[Spec, Target]] = []


def _compile_index(i: int) -> Dict:
    spec, target = _POOL_SPECS[i]
    return compile_spec(spec, target)


def compile_all(work: Sequence[Tuple[Spec, Target]], jobs: int,
                progress: Optional[Callable[[int, int], None]] = None,
                cached_only: bool = False) -> List[Optional[Dict]]:
    """compile_spec over (spec, target) pairs; ``jobs`` > 1 forks workers (they inherit
    the captured specs, so nothing but an index crosses the process boundary)."""
    global _POOL_SPECS
    if cached_only:
        return [compile_spec(s, t, cached_only=True) for s, t in work]
    if jobs <= 1 or len(work) < 4:
        out = []
        for i, (s, t) in enumerate(work):
            out.append(compile_spec(s, t))
            if progress:
                progress(i + 1, len(work))
        return out
    import multiprocessing as mp
    _POOL_SPECS = list(work)
    try:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as ex:
            out = []
            for i, r in enumerate(ex.map(_compile_index, range(len(work)), chunksize=4)):
                out.append(r)
                if progress:
                    progress(i + 1, len(work))
            return out
    finally:
        _POOL_SPECS = []


# ------------------------------------------------------------------- csrc/cuda
_NVCC_FUNC = re.compile(r"Function properties for (\S+)")
_NVCC_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_nvcc_report(log: str) -> List[Dict]:
    """Per function of a `nvcc -Xptxas -v` log: registers, stack, spills, static smem."""
    rows, cur = [], None
    for line in log.splitlines():
        m = _NVCC_FUNC.search(line)
        if m:
            cur = dict(function=m.group(1), regs=0, stack=0, spill_stores=0, spill_loads=0, smem=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_PROPS.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(v) for v in m.groups())
            continue
        m = _NVCC_USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            cur["smem"] = int(m.group(2) or 0)
            cur = None
    names = _demangle([r["function"] for r in rows])
    for r in rows:
        r["function"] = names[r["function"]]
    return rows


def nvcc_path() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cand = Path(home) / "bin" / "nvcc"
    return str(cand) if cand.exists() else None


def audit_cuda(root: Path, archs=("80", "90a"), jobs: int = 2,
               only: Optional[Sequence[str]] = None) -> Dict:
    """nvcc -Xptxas -v of every csrc/cuda/*.cu (or the file names in `only`) for each arch
    (the build's flags); cached by the sources' contents and nvcc's version."""
    nvcc = nvcc_path()
    if nvcc is None:
        return dict(available=False, reason="nvcc not found (CUDA_HOME/bin or PATH)", files=[])
    files = sorted(p for p in (root / "csrc" / "cuda").glob("*.cu") if only is None or p.name in only)
    if only is not None and len(files) != len(set(only)):
        raise ValueError(f"audit_cuda: no such csrc/cuda files: {sorted(set(only) - {p.name for p in files})}")
    h = hashlib.sha256()
    for p in sorted((root / "csrc" / "include").rglob("*")) + files:
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode())
    h.update(",".join(archs).encode())
    path = cache_dir() / "nvcc" / f"{h.hexdigest()[:32]}.json"
    if path.exists():
        return json.loads(path.read_text())

    def one(args):
        f, arch = args
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [nvcc, "-c", "-O3", "--expt-relaxed-constexpr", "-lineinfo", "-std=c++17",
                   f"-I{root / 'csrc' / 'include'}", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                   "-Xptxas", "-v", str(f), "-o", os.path.join(tmp, "k.o")]
            r = subprocess.run(cmd, capture_output=True, text=True)
        ok = r.returncode == 0
        err = "" if ok else next((ln for ln in r.stderr.splitlines() if "error" in ln),
                                 r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed")
        return dict(file=f.name, arch=f"sm_{arch}", ok=ok, error=err,
                    functions=parse_nvcc_report(r.stderr) if ok else [])

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, jobs)) as ex:
        out = list(ex.map(one, [(f, a) for f in files for a in archs]))
    res = dict(available=True, nvcc=version.strip().splitlines()[-1], files=out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res


# ------------------------------------------------------------------------- audit
def row(spec: Spec, target: Target, res: Dict) -> Dict:
    return dict(target=target.cap, kernel=spec.kernel, config=spec.config, role=spec.role,
                cases=list(spec.cases), group=spec.group, smem_limit=target.smem_per_block, **res)


def kernel_inventory() -> List[str]:
    """Every @triton.jit kernel (a name ending in _kernel) of the triton backend."""
    from triton.runtime.jit import JITFunction

    from imagen_fast.kernels.triton import attention, group_norm, rms_norm, threshold
    out = []
    for mod in (attention, group_norm, rms_norm, threshold):
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                out.append(f"{mod.__name__.rsplit('.', 1)[-1]}.{name}")
    return sorted(out)


def ci_scope() -> Scope:
    """Small presets at batch 1: every kernel and role, for the CI subset's coverage."""
    return Scope(("tiny-base32", "tiny-sr64"), (64,), (1,), (1,), (1,))


def _tile_weight(s: Spec) -> float:
    """Elements of the constexpr tile per thread (x2 for fp32 data): a rough order of
    register use, to pick configs when no earlier audit says which are heaviest."""
    elems = 1
    for path, v in s.constexprs.items():
        name = s.fn.arg_names[path[0]]
        if name in ("BM", "BN", "DP", "GB", "CB", "BS", "BLOCK", "NB", "SB", "CH") and v > 1:
            elems *= v
    return elems / (s.num_warps * 32) * (2 if s.config.startswith("fp32") else 1)


def select_ci(target: Target, picks: Sequence[Dict], log=print) -> List[Spec]:
    """The CI subset for one target: the configs the last full audit found heaviest
    (``picks``: kernel, role class, config and the shape-table case that launches it;
    results/gpu_compile.json), recaptured from the current code (a config that changed
    is replaced by what its case launches now), and, for every kernel and role class no
    pick covers, the heaviest by tile size over a small scope."""
    chosen: Dict[str, Spec] = {}
    mine = [p for p in picks if p["target"] == target.cap]
    for group in sorted({p["group"] for p in mine}):
        specs = capture(target, full_scope(), groups=[group])
        for p in (p for p in mine if p["group"] == group):
            same = [s for s in specs if s.kernel == p["kernel"] and (s.role != "candidate") == p["launched"]]
            exact = [s for s in same if s.config == p.get("config")]
            for s in exact or same:
                chosen.setdefault(s.ident, s)
    stale = sum(1 for p in mine if not any(s.config == p.get("config") for s in chosen.values()))
    covered = {(s.kernel, s.role != "candidate") for s in chosen.values()}
    small = capture(target, ci_scope())
    for key in sorted({(s.kernel, s.role != "candidate") for s in small} - covered):
        best = max((s for s in small if (s.kernel, s.role != "candidate") == key), key=_tile_weight)
        chosen.setdefault(best.ident, best)
    log(f"sm_{target.cap}: CI subset {len(chosen)} configs ({len(mine)} picks from the last full "
        f"audit, {stale} of them changed since; {len(chosen) - len(mine) + stale} for coverage)")
    return list(chosen.values())


def compile_order(work: Sequence[Tuple[Spec, Target]]) -> List[Tuple[Spec, Target]]:
    """Launched configs before candidates; within each, one config of every (kernel,
    target) in turn, so that an interrupted run (its results are cached) has audited
    part of every kernel rather than all of the first few."""
    out = []
    for launched_role in (True, False):
        buckets: Dict[tuple, List] = {}
        for s, t in work:
            if (s.role != "candidate") == launched_role:
                buckets.setdefault((s.kernel, t.cap), []).append((s, t))
        for i in range(max((len(b) for b in buckets.values()), default=0)):
            out += [b[i] for b in buckets.values() if i < len(b)]
    return out


def coverage(work: Sequence[Tuple[Spec, Target]], results: Sequence[Optional[Dict]]) -> Dict:
    """Captured and compiled configs per target and kernel, launched and candidates (a
    --cached-only report before the full run has finished has fewer compiled):
    {cap: {kernel: [launched, launched compiled, candidates, candidates compiled]}}."""
    out: Dict[str, Dict[str, List[int]]] = {}
    for (s, t), r in zip(work, results):
        c = out.setdefault(str(t.cap), {}).setdefault(s.kernel, [0, 0, 0, 0])
        i = 0 if s.role != "candidate" else 2
        c[i] += 1
        c[i + 1] += r is not None
    return out


def run_audit(targets: Sequence[Target], scope: Scope, subset: str = "full", jobs: int = 2,
              log=print, kernels: Sequence[str] = (), launched_only: bool = False,
              picks: Sequence[Dict] = (), cached_only: bool = False) -> Dict:
    """Capture every target's specialisations (or the CI subset), then compile them all
    (launched configs first, so an interrupted run has cached those; ``cached_only``:
    compile nothing, report what earlier runs compiled and count the rest)."""
    import triton
    work: List[Tuple[Spec, Target]] = []
    for t in targets:
        t0 = time.perf_counter()
        specs = select_ci(t, picks, log) if subset == "ci" else capture(t, scope)
        if kernels:
            specs = [s for s in specs if any(k in s.kernel for k in kernels)]
        if launched_only:
            specs = [s for s in specs if s.role != "candidate"]
        log(f"sm_{t.cap}: {len(specs)} distinct specialisations "
            f"({sum(s.role != 'candidate' for s in specs)} launched untuned) captured in "
            f"{time.perf_counter() - t0:.0f} s")
        work += [(s, t) for s in specs]
    work = compile_order(work)
    t0 = time.perf_counter()
    step = max(1, len(work) // 20)

    def progress(i, n):
        if i % step == 0 or i == n:
            log(f"  compiled {i}/{n} ({time.perf_counter() - t0:.0f} s)")
    results = compile_all(work, jobs, progress, cached_only=cached_only)
    rows = [row(s, t, r) for (s, t), r in zip(work, results) if r is not None]
    missing = [] if kernels else [
        f"sm_{t.cap} {k}: never launched by the shape table, not audited"
        for t in targets for k in kernel_inventory()
        if not any(s.kernel == k and st.cap == t.cap for s, st in work)]
    return dict(triton=triton.__version__, subset=subset, scope=_scope_dict(scope),
                targets=[t.__dict__ for t in targets], rows=rows, launched_only=launched_only,
                coverage=coverage(work, results), unaudited=missing)


def _scope_dict(scope: Scope) -> Dict:
    return {k: list(v) for k, v in scope.__dict__.items()}


# ------------------------------------------------------------- on a real GPU
def device_run(scope: Scope, budget_s: float = 300.0, log=print) -> Dict:
    """On a CUDA GPU: the package's own wrappers run at real (batch 1-2) shapes of the
    shape table, every autotuner candidate launched once besides the default, so each
    config they reach is compiled, loaded and launched; then every loaded binary's
    registers and local memory as the driver reports them (cuFuncGetAttribute, via
    CompiledKernel.n_regs / n_spills), with the same config text as the ahead-of-time
    rows (compare with results/gpu_compile_configs.json). Stops starting cases after
    budget_s."""
    import torch
    from triton.runtime.jit import JITFunction

    from imagen_fast.kernels.triton import _common as cm
    if not torch.cuda.is_available():
        raise RuntimeError("--device-run needs a CUDA GPU")
    cap = "".join(map(str, torch.cuda.get_device_capability()))
    failures: List[str] = []

    def pick_config(name, key, device, candidates, run, default):
        for cfg in candidates:       # each candidate loaded and launched once
            try:
                run(cfg)
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run is a finding
                failures.append(f"{name} candidate {cfg}: {type(e).__name__}: {error_line(e)}")
        return default

    saved = cm.pick_config
    cm.pick_config = pick_config
    t0, done, skipped = time.perf_counter(), 0, 0
    try:
        for label, fn in _device_cases(scope):
            if time.perf_counter() - t0 > budget_s:
                skipped += 1
                continue
            try:
                fn()
                torch.cuda.synchronize()
                done += 1
            except Exception as e:  # noqa: BLE001
                failures.append(f"{label}: {type(e).__name__}: {error_line(e)}")
    finally:
        cm.pick_config = saved
    binaries = []
    from imagen_fast.kernels.triton import attention, group_norm, rms_norm, threshold
    for mod in (attention, group_norm, rms_norm, threshold):
        for name, fn in vars(mod).items():
            if not (isinstance(fn, JITFunction) and name.endswith("_kernel")):
                continue
            for cache in fn.device_caches.values():
                for k in cache[0].values():
                    if getattr(k, "function", None) is None:      # never loaded
                        continue
                    md = k.metadata
                    spec = Spec(f"{mod.__name__.rsplit('.', 1)[-1]}.{name}", fn,
                                dict(k.src.signature), dict(k.src.constants), dict(k.src.attrs),
                                md.num_warps, md.num_stages)
                    binaries.append(dict(kernel=spec.kernel, config=spec.config, regs=k.n_regs,
                                         local_bytes=4 * k.n_spills, shared=md.shared))
    for f in failures:
        log("FAILED " + f)
    log(f"device run on sm_{cap} ({torch.cuda.get_device_name()}): {done} cases run, {skipped} "
        f"left for lack of time, {len(binaries)} binaries loaded and launched, max regs "
        f"{max((b['regs'] for b in binaries), default=0)}, "
        f"{sum(b['local_bytes'] > 0 for b in binaries)} with local memory, "
        f"{len(failures)} failures")
    return dict(device=torch.cuda.get_device_name(), cap=cap, cases_run=done,
                cases_skipped=skipped, failures=failures, binaries=binaries)


def _device_cases(scope: Scope) -> Iterator[Tuple[str, Callable[[], None]]]:
    """The ops on CUDA tensors (backend triton) at every distinct feature map, attention
    shape and image size of the shape table at batch 1-2, largest first, every dtype."""
    import torch

    from imagen_fast.bench.shapes import attn_shapes, image_shape
    from imagen_fast import ops
    dev = torch.device("cuda")

    def rnd(*shape, dt):
        return torch.randn(*shape, device=dev, dtype=torch.float32).to(dt)

    maps = sorted(_norm_maps(scope), key=lambda m: -m[0] * m[1] * m[2])
    for (c, h, w, groups, act, film), dn in itertools.product(maps, scope.dtypes):
        def gn(c=c, h=h, w=w, groups=groups, act=act, film=film, dt=_dt(dn)):
            for cl in (False, True):
                x = rnd(2, c, h, w, dt=dt)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_()
                wt = torch.randn(c, device=dev, requires_grad=True)
                s = torch.randn(2, c, device=dev, requires_grad=True) if film else None
                a = None if act == "none" else act
                with ops.use_backend("triton"):
                    ops.group_norm_silu(x, groups, wt, wt, scale=s, shift=s,
                                        activation=a).float().sum().backward()
                    ops.channel_rms_norm_silu(x, wt, scale=s, shift=s,
                                              activation=a).float().sum().backward()
        yield f"norm {c}x{h}x{w} g{groups} {dn}", gn
    shapes = {(a.heads, a.lq, a.lk, a.d) for a in attn_shapes(scope.presets, scope.text_lens)}
    for (heads, lq, lk, d), dn in itertools.product(sorted(shapes, key=lambda t: -t[1] * t[2]),
                                                    scope.dtypes):
        def attn(heads=heads, lq=lq, lk=lk, d=d, dt=_dt(dn)):
            q = rnd(1, heads, lq, d, dt=dt).requires_grad_()
            kv = rnd(1, heads, lk, d, dt=dt).requires_grad_()
            for mask in (torch.rand(1, lk, device=dev) > 0.3, None):
                with ops.use_backend("triton"):
                    ops.attention(q, kv, kv, mask).float().sum().backward()
        yield f"attention {heads}x{lq}x{lk}x{d} {dn}", attn
    for r, dn in itertools.product(sorted({image_shape(p).h for p in scope.presets}, reverse=True),
                                   scope.dtypes):
        def image(r=r, dt=_dt(dn)):
            z = rnd(2, 3, r, r, dt=dt)
            with ops.use_backend("triton"):
                ops.dynamic_threshold(z * 3)
                for thr in ("dynamic", "static", "none"):
                    ops.sampler_step(z, z * 0.5, z * 0.3, alpha_t=0.5, sigma_t=0.8, alpha_s=0.7,
                                     sigma_s=0.6, noise=z.clone(), threshold=thr)
        yield f"image {r}x{r} {dn}", image


# -------------------------------------------------------------------------- main
def _reexec_without_interpreter(argv: Sequence[str]) -> int:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call([sys.executable, "-m", "benchmarks.gpu_compile", *argv], env=env)


def _commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_compile",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="80,90", help="compute capabilities (80, 90)")
    ap.add_argument("--subset", choices=["full", "ci"], default="full",
                    help="ci: every kernel and role, the heaviest configs of each (minutes)")
    ap.add_argument("--presets", default=None, help="comma list (default: every preset)")
    ap.add_argument("--kernels", default="", help="comma list of substrings of kernel names "
                    "(e.g. attention,_gn_fwd): audit only those (while fixing one)")
    ap.add_argument("--launched-only", action="store_true",
                    help="skip the autotuner candidates (while fixing defaults)")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--no-cuda", action="store_true", help="skip the csrc/cuda nvcc audit")
    ap.add_argument("--check", action="store_true", help="exit 1 on any rule violation")
    ap.add_argument("--no-report", action="store_true", help="write no results files")
    ap.add_argument("--out", default="gpu_compile",
                    help="results/<out>.md, <out>.json (compact) and <out>_configs.json (every row)")
    ap.add_argument("--baseline", default=None,
                    help="an earlier audit's compact JSON for the before/after table "
                         "(default results/<out>_before.json when it exists)")
    ap.add_argument("--cached-only", action="store_true",
                    help="compile nothing: report what earlier runs compiled (cached) and count "
                         "the configs not compiled yet (a report while a full run goes on)")
    ap.add_argument("--from-configs", default=None, metavar="PATH",
                    help="write the report from an earlier run's <out>_configs.json, compiling nothing")
    ap.add_argument("--device-run", action="store_true",
                    help="on a CUDA GPU: load and launch each config, registers from the driver")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="--device-run: stop starting cases after this many seconds")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _reexec_without_interpreter(argv)
    partial = (args.subset == "ci" or args.kernels or args.launched_only or args.presets
               or args.dtypes != ",".join(DTYPES) or args.targets != "80,90")
    if partial and args.out == "gpu_compile":
        args.out = "gpu_compile_partial"   # never overwrite the full audit's report
    root = Path(__file__).resolve().parents[1]
    scope = full_scope()
    scope = Scope(tuple(p for p in args.presets.split(",") if p) if args.presets else scope.presets,
                  scope.text_lens, scope.gn_batches, scope.attn_batches, scope.image_batches,
                  tuple(d for d in args.dtypes.split(",") if d))
    if args.device_run:
        import torch
        if not torch.cuda.is_available():
            print("gpu_compile: --device-run but no CUDA GPU is visible (torch.cuda.is_available() "
                  "is False); the ahead-of-time audit runs without one", file=sys.stderr)
            return 2
        res = device_run(scope, args.budget_s)
        if not args.no_report:
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"{args.out}_device.json").write_text(json.dumps(res, indent=1))
        return 1 if res["failures"] and args.check else 0
    try:
        targets = [TARGETS[int(t)] for t in args.targets.split(",")]
    except (KeyError, ValueError):
        ap.error(f"--targets must be a comma list of {sorted(TARGETS)}, got {args.targets!r}")
    if args.from_configs:        # rewrite the report from an earlier run's rows
        audit = json.loads(Path(args.from_configs).read_text())
        write_report(audit, audit.get("cuda", {}), args.out, args.baseline)
        return 1 if (args.check and problems(audit["rows"])) else 0
    picks: List[Dict] = []
    if args.subset == "ci" and (RESULTS / "gpu_compile.json").exists():
        picks = json.loads((RESULTS / "gpu_compile.json").read_text()).get("ci_picks", [])
    t0 = time.perf_counter()
    audit = run_audit(targets, scope, args.subset, args.jobs,
                      kernels=[k for k in args.kernels.split(",") if k],
                      launched_only=args.launched_only, picks=picks,
                      cached_only=args.cached_only)
    audit["commit"] = _commit(root)
    cuda = dict(available=False, reason="--no-cuda") if args.no_cuda else audit_cuda(root, jobs=args.jobs)
    probs = (problems(audit["rows"]) + cuda_problems(cuda) + audit["unaudited"]
             + not_compiled(audit["coverage"]))
    for p in probs:
        print("VIOLATION " + p)
    for t in targets:
        s = summary(audit["rows"], t.cap)
        print(f"sm_{t.cap}: {s['configs']} configs, {s['failures']} compile failures, "
              f"{s['over_smem']} over shared memory, {s['spilling_launched']} spilling launched "
              f"(largest {s['largest_launched_spill']} B), {s['spilling_candidates']} spilling "
              f"candidates, largest spill {s['largest_spill']} B, max regs {s['max_regs']}, "
              f"max shared {s['max_shared']} B")
    print(f"audit done in {time.perf_counter() - t0:.0f} s")
    if not args.no_report:
        audit["cuda"] = cuda
        write_report(audit, cuda, args.out, args.baseline)
    return 1 if (args.check and probs) else 0


def write_report(audit: Dict, cuda: Dict, out: str, baseline: Optional[str]) -> None:
    """results/<out>.md and <out>.json (compact, committed) and <out>_configs.json (every
    row); the before/after table from ``baseline`` (default results/<out>_before.json)."""
    path = Path(baseline) if baseline else RESULTS / f"{out}_before.json"
    before = json.loads(path.read_text()) if path.exists() else None
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out}_configs.json").write_text(json.dumps(audit))
    (RESULTS / f"{out}.json").write_text(json.dumps(compact(audit, cuda), indent=1) + "\n")
    (RESULTS / f"{out}.md").write_text(markdown(audit, cuda, before))
    print(f"report: {RESULTS / (out + '.md')}")


if __name__ == "__main__":
    sys.exit(main())
