"""Counting the samples a dataset could not use.

Bad input (an unreadable image, a sample without a caption, a truncated shard...) is never a
crash and never a silent hole: the sample is skipped, the reason is counted, and the first
few of each reason are logged with the sample's key. The counts live in a small shared-memory
tensor with one row per process, so DataLoader workers (forked or spawned) write them where
the main process reads them, without locks: each worker only writes its own row.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch

log = logging.getLogger("imagen_fast.data")

#: every reason a sample can be skipped for
REASONS = (
    "corrupt_image",      # the image bytes do not decode (truncated, not an image, bomb...)
    "missing_image",      # a caption (or metadata) with no image file
    "missing_caption",    # an image with no .txt (nor a json "caption")
    "empty_caption",      # the caption is empty or whitespace
    "bad_caption",        # the caption is not UTF-8
    "too_small",          # smaller than the dataset's min_size
    "transform_error",    # the transform raised
    "unreadable_shard",   # a shard (tar) or file that cannot be opened / read to the end
)
_MAX_ROWS = 129            # row 0: the main process; row 1 + w: DataLoader worker w
_LOG_FIRST = 3             # log this many examples per reason and process


class SkipCounter:
    """Counts of skipped samples by reason, plus the number of good samples (``ok``)."""

    def __init__(self):
        self._t = torch.zeros(_MAX_ROWS, len(REASONS) + 1, dtype=torch.int64).share_memory_()
        self._logged: Dict[str, int] = {}

    def _row(self) -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else 1 + info.id % (_MAX_ROWS - 1)

    def add_ok(self, n: int = 1) -> None:
        self._t[self._row(), -1] += n

    def skip(self, reason: str, key: str = "?", detail: str = "") -> None:
        """Count one skipped sample (logs the first few of each reason with their key)."""
        i = REASONS.index(reason)        # a typo in a reason is a bug: ValueError
        self._t[self._row(), i] += 1
        k = self._logged.get(reason, 0)
        if k < _LOG_FIRST:
            self._logged[reason] = k + 1
            more = " (further ones are counted, not logged)" if k + 1 == _LOG_FIRST else ""
            log.warning("skipped sample %s: %s%s%s", key, reason, f": {detail}" if detail else "", more)

    # -- reading ------------------------------------------------------------------------------
    def counts(self) -> Dict[str, int]:
        """{reason: count} for every reason with a non-zero count."""
        tot = self._t.sum(0).tolist()
        return {r: int(c) for r, c in zip(REASONS, tot[:-1]) if c}

    @property
    def ok(self) -> int:
        return int(self._t[:, -1].sum())

    @property
    def skipped(self) -> int:
        return int(self._t[:, :-1].sum())

    def summary(self) -> str:
        c = self.counts()
        seen = self.ok + self.skipped
        if not c:
            return f"data: {self.ok} samples read, none skipped"
        parts = ", ".join(f"{r} {n}" for r, n in sorted(c.items(), key=lambda x: -x[1]))
        return f"data: {self.ok} samples read, {self.skipped} of {seen} skipped ({parts})"

    def as_tensor(self) -> torch.Tensor:
        """(len(REASONS) + 1,) int64 totals, last entry ``ok``: all_reduce it across ranks."""
        return self._t.sum(0)

    def state_dict(self) -> dict:
        return {"ok": self.ok, **self.counts()}

    def load_state_dict(self, state: dict) -> None:
        """Restore totals (e.g. on resume): they go to row 0, other rows are cleared."""
        self.reset()
        for r, n in state.items():
            if r == "ok":
                self._t[0, -1] = int(n)
            elif r in REASONS:
                self._t[0, REASONS.index(r)] = int(n)
            else:
                raise ValueError(f"state: unknown skip reason {r!r}")

    def reset(self) -> None:
        self._t.zero_()
        self._logged.clear()

    def __repr__(self) -> str:
        return f"SkipCounter({self.summary()})"


class SkipSample(Exception):
    """Raised inside decoding to skip a sample for ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def describe(e: BaseException, limit: int = 160) -> Optional[str]:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= limit else s[:limit - 3] + "..."
