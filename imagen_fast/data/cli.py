"""`imagen-fast data ...`: dataset tools. Wire into the main parser with
``add_data_parser(subparsers)``; each subcommand sets ``func(args) -> exit status``.

    imagen-fast data shapes --out DIR --num N [--seed S] [--resolution 64] [--shard-size 1000]
                            [--split all|train|heldout]
    imagen-fast data cache  --data SPEC --out DIR [--encoder minilm] [--batch-size 256]
    imagen-fast data check  --data SPEC [--size 64]

Mistakes a user can make (a missing directory, an existing output, a bad value) print one
line and return 2.
"""
from __future__ import annotations

import argparse
import sys
import time

_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError, KeyError)


def _fail(e: BaseException) -> int:
    print(f"imagen-fast: error: {e}", file=sys.stderr)
    return 2


def _progress(label: str):
    t0 = time.perf_counter()

    def cb(done: int, total: int):
        el = time.perf_counter() - t0
        rate = done / el if el > 0 else 0.0
        end = "\n" if done >= total else ""
        print(f"\r{label}: {done}/{total} ({rate:.0f}/s)", end=end, file=sys.stderr, flush=True)
    return cb


def cmd_shapes(args) -> int:
    from .shapes import write_shapes
    try:
        m = write_shapes(args.out, args.num, args.seed, args.resolution, shard_size=args.shard_size,
                         image_format=args.format, overwrite=args.overwrite, split=args.split,
                         progress=None if args.quiet else _progress("shapes"))
    except _USER_ERRORS as e:
        return _fail(e)
    print(f"wrote {m['num']} images in {len(m['shards'])} shards to {args.out}")
    return 0


def iter_captions(dataset):
    """Captions of every sample of a StreamDataset's source, in order, without decoding
    images; samples without a usable caption are counted in ``dataset.skips``."""
    from .skips import SkipSample
    src = dataset.source
    for u in range(src.num_units()):
        for rec in src.records(u, on_error=dataset._unit_error):
            try:
                yield dataset._caption(rec, dataset._meta(rec))
            except SkipSample as s:
                dataset.skips.skip(s.reason, rec.key, s.detail)


def cmd_cache(args) -> int:
    from imagen_fast.text import build_embedding_cache, get_text_encoder

    from . import open_dataset
    try:
        ds = open_dataset(args.data, shuffle=False)
        caps = list(iter_captions(ds))
        if not caps:
            raise ValueError(f"data: no captions found in {args.data}")
        kw = {"device": args.device}
        if args.dtype:
            kw["dtype"] = args.dtype
        if args.max_length:
            kw["max_length"] = args.max_length
        enc = get_text_encoder(args.encoder, **kw)
        cache = build_embedding_cache(enc, caps, args.out, batch_size=args.batch_size,
                                      overwrite=args.overwrite,
                                      progress=None if args.quiet else _progress("encode"))
    except (*_USER_ERRORS, OSError) as e:
        return _fail(e)
    print(f"cached {len(cache)} distinct captions ({len(caps)} samples) from {enc.name} "
          f"(dim {cache.dim}) in {args.out}")
    if ds.skips.skipped:
        print(ds.skips.summary())
    return 0


def cmd_check(args) -> int:
    from . import make_loader, open_dataset, transform_for_stage
    try:
        ds = open_dataset(args.data, transform_for_stage(args.size), shuffle=False, epochs=1)
    except _USER_ERRORS as e:
        return _fail(e)
    n, t0 = 0, time.perf_counter()
    for b in make_loader(ds, 64, num_workers=args.workers):
        n += len(b["key"])
    dt = time.perf_counter() - t0
    print(f"{ds.source.describe()}: {n} usable samples ({n / max(dt, 1e-9):.0f} images/s)")
    print(ds.skips.summary())
    return 0 if n else 1


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``data`` and its subcommands on an argparse subparsers object."""
    p = subparsers.add_parser("data", help="datasets: synthetic shapes, embedding cache, checks")
    sub = p.add_subparsers(dest="data_command", required=True)

    s = sub.add_parser("shapes", help="write the synthetic shapes dataset as tar shards")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--num", type=int, required=True, help="number of images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resolution", type=int, default=64)
    s.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    s.add_argument("--format", choices=["png", "jpg"], default="png")
    s.add_argument("--split", choices=["all", "train", "heldout"], default="all",
                   help="train: leave out the held-out caption combinations (for evaluation)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_shapes)

    s = sub.add_parser("cache", help="precompute caption embeddings into a memory-mapped cache")
    s.add_argument("--data", required=True, help="shard dir / pattern, image folder, or shapes:N")
    s.add_argument("--out", required=True, help="cache directory")
    s.add_argument("--encoder", default="minilm", help="text encoder name (minilm, t5:<path>, ...)")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--dtype", default=None, help="encoder weights: bf16, fp16, fp32, auto")
    s.add_argument("--device", default="cpu")
    s.add_argument("--max-length", type=int, default=None)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_cache)

    s = sub.add_parser("check", help="decode every sample once; report the skipped ones")
    s.add_argument("--data", required=True)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--workers", type=int, default=0)
    s.set_defaults(func=cmd_check)
    return p


def main(argv=None) -> int:
    """Standalone entry (``python -m imagen_fast.data.cli shapes ...``) until the main CLI has it."""
    parser = argparse.ArgumentParser(prog="imagen-fast")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
