"""Rules for plain torch.nn modules, shared by every library patch."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .. import ops
from ._core import Rule


def activation_name(module) -> Optional[str]:
    """The ops activation equal to this module ("silu", exact "gelu"), or None."""
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    return None


def group_norm(x, norm: nn.GroupNorm, scale=None, shift=None, activation=None):
    """ops.group_norm_silu with an nn.GroupNorm's parameters."""
    return ops.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, scale, shift,
                               activation)


class FastGroupNorm(nn.GroupNorm):
    _imagen_fast_original = nn.GroupNorm

    def forward(self, x):
        return group_norm(x, self)


def _check_group_norm(m: nn.GroupNorm):
    return FastGroupNorm, "ops.group_norm_silu (no activation)"


GROUP_NORM = Rule(nn.GroupNorm, _check_group_norm)
