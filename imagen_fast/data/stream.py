"""The streaming dataset: split across ranks and DataLoader workers, shuffled, decoded, with
bad samples skipped and counted, and a position that can be saved and resumed.

Splitting (each sample is read by exactly one (rank, worker) per epoch). With R ranks and W
workers per rank there are G = R * max(W, 1) global workers, worker ``g = rank * W + w``.
* tar shards, at least G of them: the epoch's shard order (shuffled by seed and epoch) is
  dealt out round-robin, shard ``i`` to worker ``i % G``;
* fewer shards than workers, or a folder: every worker walks the same order and keeps the
  records whose running index ``j`` has ``j % G == g``.
Shard-level splitting can leave ranks with a few samples more or fewer in an epoch; the
stream is infinite by default (``epochs=None``), so a training loop that counts steps never
waits on it.

Sample dicts: ``image`` (3, S, S) float in [-1, 1], ``caption`` str, ``key`` str, ``pos``
int64 (4,) = (global worker, number of global workers, epoch, index of the record in that
worker's epoch), and
``lowres`` (3, s, s) for super-resolution transforms, ``meta`` (the .json, parsed) when
``with_meta=True``. ``collate`` stacks tensors and keeps strings and dicts as lists.

Resume: feed every consumed batch (each one, in order) to a ``StreamPosition``; save its
``state_dict()``; on resume call ``dataset.set_position(state)`` before building the
DataLoader. Each worker re-reads its epoch's records without decoding them up to the last
consumed one and goes on from there, and the workers are rotated so that the new loader's
first batch comes from the worker that owed the next one: the resumed batches are exactly
those an uninterrupted run would have produced, in the same order (for endless streams; a
finite stream's tail, where workers run dry at different times, keeps the same set of
samples). This holds when world size, worker count, seed and data are unchanged; otherwise
the position restarts at the earliest saved epoch, with a warning. Random crops are seeded
by (seed, epoch, worker, index), so they replay identically too.
"""
from __future__ import annotations

import json
import logging
import random
from typing import Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .skips import SkipCounter, SkipSample, describe
from .sources import IMAGE_EXTS, Record, open_source
from .transforms import ImageTransform, open_image

log = logging.getLogger("imagen_fast.data")


def _dist_rank_world():
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover
        pass
    return 0, 1


def _shuffle_buffer(it: Iterator[Record], size: int, rng: random.Random) -> Iterator[Record]:
    buf: List[Record] = []
    for r in it:
        if len(buf) < size:
            buf.append(r)
            continue
        i = rng.randrange(size)
        out, buf[i] = buf[i], r
        yield out
    rng.shuffle(buf)
    yield from buf


class StreamDataset(IterableDataset):
    """Image-caption stream over a source (see module docstring).

    Args:
        source: a ``TarShards`` / ``ImageFolder`` / ``ShapesSource``, or a spec for
            ``open_source`` (directory of shards, directory of images, shard pattern).
        transform: an ``ImageTransform`` (default: 64 px center crop).
        shuffle: shuffle shard/item order per epoch and through a buffer.
        shuffle_buffer: records held for shuffling in each worker (0 = order only).
        seed: base seed of every random choice.
        epochs: None = endless; an int = that many epochs from ``start_epoch``.
        rank, world_size: default from torch.distributed when it is initialized.
        min_size: images whose shorter side is below this are skipped ('too_small').
        with_meta: add the parsed .json as ``meta``.
        counter: a ``SkipCounter`` to share (one is made otherwise: ``dataset.skips``).
    """

    def __init__(self, source, transform: Optional[ImageTransform] = None, *, shuffle: bool = True,
                 shuffle_buffer: int = 256, seed: int = 0, epochs: Optional[int] = None,
                 start_epoch: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None,
                 min_size: int = 0, with_meta: bool = False, counter: Optional[SkipCounter] = None):
        super().__init__()
        self.source = open_source(source)
        self.transform = transform or ImageTransform(64)
        if epochs is not None and (not isinstance(epochs, int) or epochs < 0):
            raise ValueError(f"epochs: expected None or an int >= 0, got {epochs!r}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer: expected >= 0, got {shuffle_buffer!r}")
        r, w = _dist_rank_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: {self.rank} not in [0, world_size={self.world_size})")
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.epochs, self.start_epoch = epochs, start_epoch
        self.min_size, self.with_meta = min_size, with_meta
        self.skips = counter or SkipCounter()
        self._resume: Dict[int, tuple] = {}
        self._resume_workers: Optional[int] = None
        self._rotation = 0

    # -- epochs and positions ----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start epoch for the next iterator (as DistributedSampler.set_epoch; set it before
        the DataLoader starts its workers: persistent workers keep the old value)."""
        self.start_epoch = int(epoch)

    def set_position(self, state: Optional[dict]) -> None:
        """Resume from a ``StreamPosition.state_dict()`` (None clears it)."""
        self._resume, self._resume_workers, self._rotation = {}, None, 0
        if not state:
            return
        if state.get("seed", self.seed) != self.seed or state.get("rank", self.rank) != self.rank \
                or state.get("world_size", self.world_size) != self.world_size:
            log.warning("data position saved with another seed/rank/world size: restarting at epoch %s",
                        state.get("min_epoch", 0))
            self.start_epoch = int(state.get("min_epoch", 0))
            return
        self._resume = {int(g): (int(e), int(n)) for g, (e, n) in state["positions"].items()}
        self._resume_workers = state.get("global_workers")
        if self._resume_workers:
            # DataLoader takes batches from its workers round-robin starting at worker 0; the
            # worker that owes the next batch must be worker 0 of the new loader
            self._rotation = int(state.get("batches", 0)) % max(1, self._resume_workers // self.world_size)
        if self._resume:
            self.start_epoch = min(e for e, _ in self._resume.values())

    def _slot(self):
        info = get_worker_info()
        nw, w = (1, 0) if info is None else (info.num_workers, info.id)
        if self._resume_workers == self.world_size * nw:
            w = (w + self._rotation) % nw
        return self.rank * nw + w, self.world_size * nw

    def _epoch_records(self, epoch: int, gid: int, G: int) -> Iterator[Record]:
        units = list(range(self.source.num_units()))
        if self.shuffle:
            random.Random(f"{self.seed}/units/{epoch}").shuffle(units)

        def read(us):
            for u in us:
                yield from self.source.records(u, on_error=self._unit_error)

        if self.source.granularity == "shard" and len(units) >= G:
            stream = read(units[gid::G])
        else:
            stream = (r for j, r in enumerate(read(units)) if j % G == gid)
        if self.shuffle and self.shuffle_buffer > 1:
            stream = _shuffle_buffer(stream, self.shuffle_buffer,
                                     random.Random(f"{self.seed}/buffer/{epoch}/{gid}"))
        return stream

    def _unit_error(self, unit: str, message: str) -> None:
        self.skips.skip("unreadable_shard", unit, message)

    # -- decoding -----------------------------------------------------------------------------
    def _caption(self, rec: Record, meta) -> str:
        raw = rec.fields.get("txt")
        if raw is None:
            raw = rec.fields.get("caption")
        if raw is None and isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            raw = meta["caption"]
        if raw is None:
            raise SkipSample("missing_caption")
        if not isinstance(raw, str):
            try:
                raw = (raw.read_bytes() if hasattr(raw, "read_bytes") else bytes(raw)).decode("utf-8")
            except UnicodeDecodeError as e:
                raise SkipSample("bad_caption", describe(e)) from None
            except OSError as e:
                raise SkipSample("missing_caption", describe(e)) from None
        cap = " ".join(raw.split())
        if not cap:
            raise SkipSample("empty_caption")
        return cap

    def _meta(self, rec: Record):
        raw = rec.fields.get("json")
        if raw is None:
            return None
        try:
            if isinstance(raw, dict):
                return raw
            data = raw.read_bytes() if hasattr(raw, "read_bytes") else bytes(raw)
            return json.loads(data)
        except (OSError, ValueError):
            return None              # metadata is optional: a broken one is just absent

    def decode(self, rec: Record, rng: random.Random) -> dict:
        """Record -> sample dict; raises SkipSample for bad input."""
        img_ext = next((e for e in IMAGE_EXTS if e in rec.fields), None)
        if img_ext is None:
            raise SkipSample("missing_image")
        meta = self._meta(rec)
        caption = self._caption(rec, meta)
        try:
            img = open_image(rec.fields[img_ext], draft_size=self.transform.draft_size)
        except Exception as e:  # any decoder failure is bad input, not a crash
            raise SkipSample("corrupt_image", describe(e)) from None
        if self.min_size and min(img.size) < self.min_size:
            raise SkipSample("too_small", f"{img.size[0]}x{img.size[1]} < {self.min_size}")
        try:
            image, low = self.transform(img, rng)
        except Exception as e:
            raise SkipSample("transform_error", describe(e)) from None
        out = {"image": image, "caption": caption, "key": rec.key}
        if low is not None:
            out["lowres"] = low
        if self.with_meta:
            out["meta"] = meta if meta is not None else {}
        return out

    def __iter__(self):
        gid, G = self._slot()
        resume = self._resume.get(gid)
        if self._resume and self._resume_workers != G:
            log.warning("data position saved with %s workers in all, now %s: restarting at epoch %s",
                        self._resume_workers, G, self.start_epoch)
            resume = None
        epoch = self.start_epoch
        stop = None if self.epochs is None else self.start_epoch + self.epochs
        if resume is not None:
            epoch = resume[0]
        while stop is None or epoch < stop:
            skip_to = resume[1] if resume is not None and resume[0] == epoch else -1
            raw = good = 0
            for n, rec in enumerate(self._epoch_records(epoch, gid, G)):
                raw += 1
                if n <= skip_to:
                    continue
                rng = random.Random(f"{self.seed}/sample/{epoch}/{gid}/{n}")
                try:
                    sample = self.decode(rec, rng)
                except SkipSample as s:
                    self.skips.skip(s.reason, rec.key, s.detail)
                    continue
                good += 1
                self.skips.add_ok()
                sample["pos"] = torch.tensor([gid, G, epoch, n], dtype=torch.int64)
                yield sample
            if stop is None and (raw == 0 or (good == 0 and skip_to < 0)):
                if raw:
                    log.error("data worker %d: no usable sample in a whole epoch; stopping", gid)
                return          # nothing assigned to this worker: an endless loop would spin
            epoch += 1


def collate(samples: List[dict]) -> dict:
    """Stack tensors; keep strings and dicts as lists."""
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


class StreamPosition:
    """Tracks the last consumed record of each global worker from the batches' ``pos``."""

    def __init__(self, dataset: Optional[StreamDataset] = None):
        self.positions: Dict[int, tuple] = {}
        self.global_workers: Optional[int] = None
        self.batches = 0
        self.seed = dataset.seed if dataset is not None else None
        self.rank = dataset.rank if dataset is not None else None
        self.world_size = dataset.world_size if dataset is not None else None

    def update(self, batch) -> None:
        pos = batch["pos"] if isinstance(batch, dict) else batch
        self.batches += 1
        for g, G, e, n in pos.reshape(-1, 4).tolist():
            self.global_workers = G
            cur = self.positions.get(g)
            if cur is None or (e, n) > cur:
                self.positions[g] = (e, n)

    def state_dict(self) -> dict:
        s = {"positions": {str(g): list(p) for g, p in sorted(self.positions.items())},
             "min_epoch": min((e for e, _ in self.positions.values()), default=0),
             "global_workers": self.global_workers, "batches": self.batches}
        for k in ("seed", "rank", "world_size"):
            if getattr(self, k) is not None:
                s[k] = getattr(self, k)
        return s

    def load_state_dict(self, state: dict) -> None:
        self.positions = {int(g): tuple(p) for g, p in state.get("positions", {}).items()}
        self.global_workers = state.get("global_workers")
        self.batches = int(state.get("batches", 0))


def make_loader(dataset: StreamDataset, batch_size: int, *, num_workers: int = 0,
                pin_memory: bool = False, prefetch_factor: Optional[int] = 2,
                persistent_workers: bool = False, drop_last: bool = False,
                multiprocessing_context=None) -> DataLoader:
    """A DataLoader over a StreamDataset with ``collate``. Workers run one torch thread each
    (DataLoader's default), so the training process keeps the cores it needs."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers!r}")
    kw = {}
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                  multiprocessing_context=multiprocessing_context)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                        pin_memory=pin_memory, drop_last=drop_last, **kw)
    return loader

