"""Drop-in acceleration of models built with other libraries.

    report = imagen_fast.accelerate(model)      # in place; weights untouched
    print(report)                               # what was replaced, what was not and why
    imagen_fast.restore(model)                  # back to the original classes

``accelerate`` walks a module tree and replaces, in place and reversibly, the
pieces it has fused ops for: GroupNorm (+ time scale/shift) + activation, channel RMS
norm + scale/shift + SiLU, attention over text tokens with a padding mask, and
dynamic thresholding. Module objects stay the same objects with the same parameters
and state_dict; only their class (or one method on the instance) changes.
It also takes a diffusers DDPMScheduler / DDIMScheduler (thresholding).

Libraries: diffusers (_diffusers.py: DeepFloyd IF-style UNet2DConditionModel and the
schedulers) and imagen-pytorch (_imagen_pytorch.py: Unet, Imagen, ElucidatedImagen).
Their rules load only when the library is already imported, so imagen_fast never
imports either itself; plain nn.GroupNorm modules are replaced in any model.
"""
from __future__ import annotations

import logging
import sys
from typing import List

from torch import nn

from ._core import PatchReport, Rule, remove_overrides, restore_tree, walk
from ._torch import GROUP_NORM

log = logging.getLogger("imagen_fast")

# Names in a module's class that suggest work a rule might have covered.
_NOTEWORTHY = ("Attention", "Norm", "Attn")


def _libraries() -> List:
    """The patch modules of the peer libraries the process has imported."""
    libs = []
    if "diffusers" in sys.modules:
        from . import _diffusers
        libs.append(_diffusers)
    if "imagen_pytorch" in sys.modules:
        from . import _imagen_pytorch
        libs.append(_imagen_pytorch)
    return libs


def _report_unhandled(root: nn.Module, report: PatchReport, claimed: set) -> None:
    """Norm and attention layers no rule covered, with nothing replaced inside them."""
    seen = {e.path for e in report.replaced + report.left_alone} | claimed
    replaced = [e.path for e in report.replaced]
    for path, module in root.named_modules():
        name = type(module).__name__
        if path in seen or not any(word in name for word in _NOTEWORTHY):
            continue
        if any(p.startswith(path + ".") for p in replaced) or not path and replaced:
            continue
        reason = (f"{name}: no fused op in imagen_fast.ops; PyTorch runs it"
                  if "Norm" in name else "no fused op for this attention; PyTorch runs it")
        report.leave(path, module, reason)


def accelerate(obj) -> PatchReport:
    """Replace, in place, the layers of obj that have fused imagen_fast ops.

    obj: an nn.Module (any model: diffusers UNet2DConditionModel, imagen-pytorch Unet /
    Imagen / ElucidatedImagen, or your own), or a diffusers DDPMScheduler /
    DDIMScheduler. Returns the report (also logged at INFO on "imagen_fast").
    Parameter names, values and the state_dict are unchanged; ``restore`` undoes it.
    """
    libs = _libraries()
    report = PatchReport()
    if isinstance(obj, nn.Module):
        rules: List[Rule] = [GROUP_NORM]
        for lib in libs:
            rules += list(lib.RULES)

        def other(path, module, rep):
            for lib in libs:
                lib.OTHER(path, module, rep)

        claimed = walk(obj, rules, report, other)
        _report_unhandled(obj, report, claimed)
    else:
        diffusers = next((lib for lib in libs if lib.__name__.endswith("_diffusers")), None)
        if diffusers is None or not diffusers.is_scheduler(obj):
            raise TypeError("accelerate takes an nn.Module or a diffusers DDPMScheduler / "
                            f"DDIMScheduler, got {type(obj).__name__}")
        diffusers.patch_scheduler(obj, report)
    log.info("%s", report.summary())
    return report


def restore(obj) -> PatchReport:
    """Undo ``accelerate`` on obj (a no-op for anything it did not patch). Returns the
    report of what was restored."""
    report = PatchReport()
    if isinstance(obj, nn.Module):
        extras = [lib.RESTORE for lib in _libraries() if hasattr(lib, "RESTORE")]

        def extra(path, module, rep):
            for fn in extras:
                fn(path, module, rep)

        restore_tree(obj, report, extra)
    elif remove_overrides(obj):
        report.replace("", obj, "restored")
    return report


__all__ = ["PatchReport", "accelerate", "restore"]
