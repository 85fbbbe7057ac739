"""The machinery shared by the library patches: class swaps, the walk, the report.

A patched module keeps its identity, its parameters, buffers, hooks and children:
only its class changes, to a subclass of the original that overrides ``forward``
(and nothing stored), so ``state_dict()`` is untouched and ``isinstance`` checks
still pass. Every such subclass names its original in ``_imagen_fast_original``;
restoring assigns it back. Objects that are not modules (attention processors,
schedulers) are swapped the same way or wrapped with a reference to the original.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from torch import nn

log = logging.getLogger("imagen_fast")


@dataclass
class Entry:
    path: str       # dotted module path in the tree ("" for the root)
    kind: str       # class name of the original object
    detail: str     # what replaced it, or why it was left alone

    def __str__(self) -> str:
        return f"{self.path or '<root>'} ({self.kind}): {self.detail}"


@dataclass
class PatchReport:
    """What ``accelerate`` replaced and what it left alone (with the reason)."""
    replaced: List[Entry] = field(default_factory=list)
    left_alone: List[Entry] = field(default_factory=list)

    def replace(self, path: str, obj, detail: str) -> None:
        self.replaced.append(Entry(path, _class_name(obj), detail))

    def leave(self, path: str, obj, reason: str) -> None:
        self.left_alone.append(Entry(path, _class_name(obj), reason))

    def summary(self) -> str:
        lines = [f"imagen_fast: replaced {len(self.replaced)}, left alone {len(self.left_alone)}"]
        lines += [f"  replaced    {e}" for e in self.replaced]
        lines += [f"  left alone  {e}" for e in self.left_alone]
        return "\n".join(lines)

    __str__ = summary


def _class_name(obj) -> str:
    cls = getattr(type(obj), "_imagen_fast_original", type(obj))
    return cls.__name__


def is_patched(obj) -> bool:
    return hasattr(type(obj), "_imagen_fast_original") or bool(overridden_methods(obj))


def swap_class(obj, fast_cls: type) -> None:
    """obj becomes an instance of fast_cls, a subclass of obj's class that adds no state."""
    if not (isinstance(fast_cls, type) and fast_cls._imagen_fast_original is type(obj)):
        raise TypeError(f"{fast_cls.__name__} does not patch {type(obj).__name__}")
    obj.__class__ = fast_cls


def unswap_class(obj) -> bool:
    original = getattr(type(obj), "_imagen_fast_original", None)
    if original is None:
        return False
    obj.__class__ = original
    return True


def fast_method(func):
    """Marks func as a method override that restore() takes away again."""
    func._imagen_fast_method = True
    return func


def override_method(obj, name: str, func) -> None:
    """obj.name = func bound to obj, on the instance only (its class and any saved
    config keep their names)."""
    setattr(obj, name, types.MethodType(func, obj))


def overridden_methods(obj):
    return [name for name, v in vars(obj).items() if isinstance(v, types.MethodType)
            and getattr(v.__func__, "_imagen_fast_method", False)]


def remove_overrides(obj) -> bool:
    names = overridden_methods(obj)
    for name in names:
        delattr(obj, name)
    return bool(names)


# A rule inspects one module; it returns None when the module is not its business,
# or (fast class or None, detail): a class to swap in, or None and the reason to leave
# the module alone. ``claims`` names children the fast forward uses directly, so the
# walk does not patch them on their own.
@dataclass(frozen=True)
class Rule:
    original: type
    check: Callable[[nn.Module], Tuple[Optional[type], str]]
    claims: Sequence[str] = ()


def _child_paths(path: str, names):
    return [f"{path}.{c}" if path else c for c in names]


def walk(root: nn.Module, rules: Sequence[Rule], report: PatchReport,
         other: Optional[Callable[[str, nn.Module, PatchReport], None]] = None) -> set:
    """Apply the rules to every module of root (parents before children); returns the
    paths of the children that patched parents use directly.

    Only exact class matches are patched: a subclass may override forward, and its
    forward is not ours to replace (it is reported as left alone).
    """
    by_class = {r.original: r for r in rules}
    claimed = set()
    for path, module in root.named_modules(remove_duplicate=True):
        if path in claimed:
            continue
        original = getattr(type(module), "_imagen_fast_original", type(module))
        rule = by_class.get(original)
        if is_patched(module):
            report.leave(path, module, "already accelerated")
            if rule is not None:
                claimed.update(_child_paths(path, rule.claims))
            continue
        if rule is None:
            base = next((r for r in rules if isinstance(module, r.original)), None)
            if base is not None:
                report.leave(path, module, f"subclass of {base.original.__name__} with its own "
                             "code: not replaced")
            elif other is not None:
                other(path, module, report)
            continue
        fast, detail = rule.check(module)
        if fast is None:
            report.leave(path, module, detail)
            continue
        swap_class(module, fast)
        report.replace(path, module, detail)
        claimed.update(_child_paths(path, rule.claims))
    return claimed


def restore_tree(root: nn.Module, report: PatchReport,
                 extra: Optional[Callable[[str, nn.Module, PatchReport], None]] = None) -> None:
    for path, module in root.named_modules(remove_duplicate=True):
        if extra is not None:
            extra(path, module, report)
        if unswap_class(module) or remove_overrides(module):
            report.replace(path, module, "restored")
