"""Backend "triton": Triton kernels for every op (CUDA GPUs; CPU tensors under
TRITON_INTERPRET=1). Importing this package registers them with the dispatcher.
The dispatcher imports it only when the triton package is installed, and lets any
error raised here propagate: a broken kernel module fails loudly, never turns into
"backend unavailable".

One op family per module:
    group_norm.py   group_norm_silu_fwd / _bwd   (fused, looped and split plans)
    rms_norm.py     channel_rms_norm_silu_fwd / _bwd  (per-position RMS over channels)
    attention.py    attention_fwd / _bwd         (flash, key padding mask)
    threshold.py    dynamic_threshold, sampler_step (radix-select percentile)
    _common.py      device facts, the shape-class autotuner, activation maths

Interpreter traps (TRITON_INTERPRET=1, how CI runs these kernels on CPU). This is the
one list of them (DEVELOPERS.md points here); add a trap here when one bites:
* tl.dot on bfloat16 (and float16) operands returns garbage: operands are upcast to
  float32 under the interpreter only (attention._dot, UPCAST).
* libdevice (triton.language.extra.libdevice) does not exist there: erf/sigmoid are
  written with tl.exp (_common.erfc_abs, sigmoid); tl.math.erf is used for float64.
* It cannot see what only a GPU shows: tl.dot needs every block dim >= 16 (kept by
  construction: BM, BN >= 16, head dim padded to >= 16), shared-memory and register
  limits per card, races between programs, real bf16 MMA rounding.
* Python float kernel arguments are float32 (interpreter and GPU alike), while float
  literals inside a kernel take the other operand's dtype: float64 kernels take their
  float64 scalars from a small tensor (attention._consts, threshold._params).
* Integer arguments equal to 1 become compile-time constants on a GPU (not in the
  interpreter): an expression such as (Cg * S).to(...) breaks when both are 1, hence
  group_norm._as_float.
* triton.autotune / do_bench need a driver: configs are fixed under the interpreter
  (_common.pick_config returns the default).
* A name assigned before a loop and again inside it is loop-carried: on a GPU it must
  keep one type (threshold._hist_kernel's `_` did not, and compiled for no card).
  benchmarks/gpu_compile.py compiles every launch for sm_80/sm_90 (CI: a subset).
* It is ~4000x slower than a GPU: tests force the multi-block / split paths with the
  modules' force_plan / force_blocks / force_launch hooks at tiny shapes.
* tl.make_block_ptr is gone in triton 3.9 (the interpreter and the GPU compiler alike):
  use tensor descriptors.
"""
import triton  # noqa: F401

from . import attention, group_norm, rms_norm, threshold  # noqa: F401,E402

__all__ = ["attention", "group_norm", "rms_norm", "threshold"]
