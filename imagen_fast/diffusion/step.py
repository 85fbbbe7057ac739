"""One guided denoising step as a function of tensors, run eagerly or compiled by
torch.compile as ONE graph (fullgraph=True) that serves every step of a run.

``guided_step(spec, model, z, t, row, noise, x0_prev, text, mask, lowres, aug)`` is the
U-Net on the 2B batch [cond | uncond], the guidance combine, thresholding and the
posterior update (``ops.sampler_step``'s tensor path), and for DPM-Solver++(2M) its
multistep update. Whatever changes from step to step is a tensor:

* ``t``, the time (0-d float32), and ``row``, the step's row of
  ``core.coefficient_table`` (float64, on the device; the whole table was made and
  checked on the host before the run);
* ``noise``: a stochastic step's noise, drawn eagerly from the caller's generator before
  the call, so a seed gives the same images compiled or eager; a step that takes none
  (the last one, whose c_noise is 0) gets zeros, so it is the same graph;
* ``x0_prev``: DPM-Solver++'s previous x0 (zeros at the first step, where d_prev = 0).

What is fixed for a run (guidance weight, threshold, percentile, sampler family, whether
guidance doubles the batch) is a ``StepSpec``: constants of the graph.

``step_function`` returns the eager function or a compiled one. Compiled steps are
cached per model, one per (spec, compile options, input shapes), and each has its OWN
code object: dynamo keeps its caches per code object, so a new stage, batch size or
setting is the first compile of its own function, never a recompile of another one's
(and never counts against dynamo's recompile limit, past which it would quietly run
the step eagerly). A run then compiles once and recompiles never.

With CUDA graphs (modes "reduce-overhead" and "max-autotune" on a GPU) the step is
captured by torch.compile's cudagraph trees: every input that is not a parameter is
copied into the graph's static buffers before a replay, and the outputs live in the
graph's memory pool, which the next replay overwrites: the caller gets clones.
"""
from __future__ import annotations

import itertools
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import ops
from ..core import COMPILE_MODES

CompileSpec = Union[None, bool, str, Mapping[str, Any]]


@dataclass(frozen=True)
class StepSpec:
    guided: bool            # the model runs on [cond | uncond] (guidance != 1 and text given)
    guidance: float
    threshold: str
    percentile: float
    multistep: bool         # DPM-Solver++(2M): rows of 9, returns x0 too


def guided_step(spec: StepSpec, model: Callable, z: Tensor, t: Tensor, row: Tensor,
                noise: Optional[Tensor], x0_prev: Optional[Tensor], text: Optional[Tensor],
                mask: Optional[Tensor], lowres: Optional[Tensor], aug: Optional[Tensor]
                ) -> Tuple[Tensor, Optional[Tensor]]:
    """(z at the next time, the step's thresholded x0 for multistep samplers else None).
    Device tensor maths only: nothing here reads a value on the host."""
    b = z.shape[0]
    zz = torch.cat([z, z]) if spec.guided else z
    kwargs = {} if lowres is None else dict(lowres=lowres, aug_level=aug)
    out = model(zz, t.expand(zz.shape[0]), text, mask, **kwargs).to(z.dtype)
    cond, uncond = (out[:b], out[b:]) if spec.guided else (out, None)
    step = dict(guidance_scale=spec.guidance, threshold=spec.threshold, percentile=spec.percentile)
    if not spec.multistep:
        return ops.sampler_step(z, cond, uncond, coefs=row, noise=noise, **step), None
    # the guided, thresholded x0: a DDIM step to t = 0 (the row's first 5)
    x0 = ops.sampler_step(z, cond, uncond, coefs=row[:5], **step)
    c_z, c_d, d_x0, d_prev = row[5:].to(z.dtype).unbind()
    d = d_x0 * x0 - d_prev * x0_prev
    return torch.where(c_z == 0, x0, c_z * z - c_d * d), x0


# --------------------------------------------------------------------- compiling
def compile_options(compile: CompileSpec, name: str = "compile") -> Optional[Dict[str, Any]]:
    """torch.compile's keyword arguments for a step, or None to run it eagerly.

    ``compile``: one of COMPILE_MODES ("none" = eager), True ("default"), False/None
    ("none"), or a dict of torch.compile's ``mode``, ``backend`` and ``options``
    (fullgraph=True and dynamic=False are always set)."""
    if compile is None or compile is False or compile == "none":
        return None
    if compile is True:
        compile = "default"
    rule = (f"{name} must be one of {', '.join(COMPILE_MODES)} (true = default, false = none) "
            f"or a dict of torch.compile's mode/backend/options, got {compile!r}")
    if isinstance(compile, str):
        if compile not in COMPILE_MODES:
            raise ValueError(rule)
        return {} if compile == "default" else {"mode": compile}
    if isinstance(compile, Mapping):
        unknown = set(compile) - {"mode", "backend", "options"}
        if unknown:
            raise ValueError(f"{name}: unknown torch.compile arguments {sorted(unknown)} "
                             f"(mode, backend and options are taken)")
        return dict(compile)
    raise ValueError(rule)


def uses_cudagraphs(options: Optional[Dict[str, Any]], device: torch.device) -> bool:
    """Whether a step compiled with ``options`` is captured as a CUDA graph on ``device``."""
    if options is None or device.type != "cuda" or options.get("backend", "inductor") != "inductor":
        return False
    settings = dict(torch._inductor.list_mode_options(options.get("mode") or "default"))
    settings.update(options.get("options") or {})
    return bool(settings.get("triton.cudagraphs"))


_serial = itertools.count()


def own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own (a unique name): dynamo's caches are per code
    object, so this function's compiles never meet another's guards."""
    n = next(_serial)
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{n}", co_qualname=f"{fn.__qualname__}_{n}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class CompiledStep:
    """A compiled ``guided_step`` with the CUDA-graph hand-off: each call marks a new
    cudagraph-trees step and clones the outputs, which the next replay overwrites."""

    def __init__(self, options: Dict[str, Any], cudagraphs: bool):
        self.options = options
        self.cudagraphs = cudagraphs
        self.fn = torch.compile(own_code(guided_step), fullgraph=True, dynamic=False, **options)

    def __call__(self, *args):
        if not self.cudagraphs:
            return self.fn(*args)
        torch.compiler.cudagraph_mark_step_begin()
        z, x0 = self.fn(*args)
        return z.clone(), (None if x0 is None else x0.clone())


_compiled: "weakref.WeakKeyDictionary[Any, Dict[tuple, CompiledStep]]" = weakref.WeakKeyDictionary()


def _signature(t: Optional[Tensor]):
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device)


def step_function(model: Callable, spec: StepSpec, compile: CompileSpec, inputs) -> Callable:
    """The step for a run: ``guided_step`` itself (eager), or the compiled step for this
    model, spec, compile options and the run's ``inputs`` (the tensors of a first call,
    for their shapes), compiled on its first call and kept while the model lives (the
    model must take weak references, as modules and functions do)."""
    options = compile_options(compile)
    if options is None:
        return guided_step
    params = getattr(model, "parameters", None)
    key = (spec, repr(sorted(options.items())), tuple(_signature(t) for t in inputs),
           frozenset((p.dtype, p.device) for p in params()) if params else None)
    per_model = _compiled.setdefault(model, {})
    if key not in per_model:
        device = next(t.device for t in inputs if t is not None)
        per_model[key] = CompiledStep(options, uses_cudagraphs(options, device))
    return per_model[key]


def compiled_steps(model: Callable) -> Dict[tuple, CompiledStep]:
    """The compiled steps kept for ``model`` (for tests and benchmarks)."""
    return dict(_compiled.get(model, {}))


def graphs_compiled(fn: Callable) -> int:
    """How many graphs dynamo holds for a compiled step or a torch.compile'd function
    (its cache entries on the function's own code object): 1 when every call since the
    first reused the first graph, more after recompiles."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    fn = fn.fn if isinstance(fn, CompiledStep) else fn
    return len(_debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__))
