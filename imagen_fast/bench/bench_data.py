"""Data pipeline throughput: images/s of the loader, against what a training step consumes.

    python -m imagen_fast.bench.bench_data [--quick] [--batch 64] [--out data_pipeline]
                                           [--results-dir DIR]

Loader paths (tar shards in the img2dataset layout, read with imagen_fast.data):
  base64 png      shapes at 64 px, PNG: decode only (no resize), the synthetic-data case
  base64 jpeg     512x384 JPEGs -> resize shorter side to 64 -> center crop 64 (draft decode)
  sr256 crop      512x384 JPEGs -> random 256 crop, low-res 64 made from it (no resize):
                  the "train SR on crops" path of the 256->1024 model, one stage down
  sr256 resize    512x384 JPEGs -> resize to 256 -> random 256 crop + 64 low-res
  base32 png      shapes 64 px -> resize 32 (the tiny demo cascade's base stage)
each with 0, 1 and 2 DataLoader workers. Rates are steady state: the prefetch queue is
drained before timing, so a queue filled during start-up does not inflate them; rounds
are interleaved over the configurations and the median is reported with min and max.

Training demand: images/s of a full training step (forward, epsilon MSE, backward, AdamW)
of preset U-Nets at their resolution on this CPU, with random text embeddings; and a step
loop fed by the loader (1 worker, sharing the same cores) against the same loop on one
fixed batch: the ratio is how much the loader slows training where it actually runs.
"""
from __future__ import annotations

import argparse
import io
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imagen_fast.bench import harness
from imagen_fast.data import StreamDataset, make_loader, transform_for_stage, write_shapes
from imagen_fast.data.shapes import make_scene, render


def _write_photo_shards(out: Path, num: int, size=(512, 384), shard_size: int = 128) -> None:
    """JPEGs with photo-like entropy (shapes over smooth gradients + grain), q=90."""
    out.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for s, start in enumerate(range(0, num, shard_size)):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tf:
            for i in range(start, min(num, start + shard_size)):
                img, rec = render(make_scene(1, i), resolution=max(w, h), supersample=1)
                a = np.asarray(img, dtype=np.float32)[:h, :w]
                phase = rng.uniform(0, 6.28, 3)
                grad = 40 * np.sin(xx[..., None] / 90 + yy[..., None] / 70 + phase)
                a = np.clip(a * 0.8 + grad + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
                b = io.BytesIO()
                from PIL import Image
                Image.fromarray(a).save(b, format="JPEG", quality=90)
                for name, data in ((f"{i:09d}.jpg", b.getvalue()), (f"{i:09d}.txt", rec["caption"].encode())):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))


def _loader_rate(ds, batch: int, workers: int, min_batches: int, min_s: float) -> float:
    """Images/s over at least ``min_batches`` batches and ``min_s`` seconds, after start-up."""
    loader = make_loader(ds, batch, num_workers=workers, prefetch_factor=2 if workers else None)
    it = iter(loader)
    for _ in range(2 * 2 * max(workers, 1) + 2):      # start-up + drain the prefetch queue
        next(it)
    n, k, t0 = 0, 0, time.perf_counter()
    while k < min_batches or time.perf_counter() - t0 < min_s:
        n += next(it)["image"].shape[0]
        k += 1
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


def _train_step_fn(preset: str, batch: int):
    from imagen_fast.models import build_unet
    model = build_unet(preset)
    cfg = model.config
    res, low = cfg["image_size"], cfg.get("lowres_size")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    text = torch.randn(batch, 16, cfg["text_dim"])
    mask = torch.ones(batch, 16, dtype=torch.bool)
    mask[:, 10:] = False

    def step(images: torch.Tensor, lowres=None):
        x0 = images[:batch]
        t = torch.rand(x0.shape[0])
        noise = torch.randn_like(x0)
        a = torch.cos(t * torch.pi / 2)[:, None, None, None]
        z = a * x0 + (1 - a * a).sqrt() * noise
        kw = {}
        if low:
            lr = lowres[:batch] if lowres is not None else torch.randn(x0.shape[0], 3, low, low)
            kw = dict(lowres=lr, aug_level=torch.zeros(x0.shape[0]))
        eps = model(z, t, text[:x0.shape[0]], mask[:x0.shape[0]], **kw)
        loss = torch.nn.functional.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, res, low


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="data_pipeline", help="results name")
    harness.add_results_arg(ap)
    ap.add_argument("--no-train", action="store_true", help="skip the training-demand part")
    args = ap.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    n_batches, min_s = (2, 0.5) if args.quick else (6, 2.0)
    batch = 16 if args.quick else args.batch
    machine = harness.machine_info()
    watch = harness.Watch()
    watch.start()
    raw = {"batch": batch, "rounds": rounds, "min_timed_batches": n_batches, "min_timed_s": min_s,
           "loader": {}, "train": {}}

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_shapes(tmp / "shapes", 256 if args.quick else 1024, seed=0, resolution=64, shard_size=128)
        _write_photo_shards(tmp / "photos", 64 if args.quick else 384, shard_size=64)
        raw["dataset_build_s"] = round(time.perf_counter() - t0, 2)
        paths = {
            "base64 png": (tmp / "shapes", transform_for_stage(64)),
            "base64 jpeg": (tmp / "photos", transform_for_stage(64)),
            "sr256 crop": (tmp / "photos", transform_for_stage(256, 64, resize=0)),
            "sr256 resize": (tmp / "photos", transform_for_stage(256, 64)),
            "base32 png": (tmp / "shapes", transform_for_stage(32)),
        }
        samples = {(p, w): [] for p in paths for w in (0, 1, 2)}
        order = list(samples)
        rng = random.Random(0)
        for _ in range(rounds):
            rng.shuffle(order)
            for p, w in order:
                src, tr = paths[p]
                ds = StreamDataset(src, tr, seed=1, shuffle_buffer=64)
                samples[(p, w)].append(_loader_rate(ds, batch, w, n_batches, min_s))
                assert ds.skips.skipped == 0, ds.skips.summary()
        loader_tab = harness.Table(
            f"Loader images/s (batch {batch}, steady state, >= {min_s} s per round, median of {rounds} rounds)",
            ["path", "source", "output", "workers", "images/s", "min", "max"])
        for (p, w), v in samples.items():
            src, tr = paths[p]
            out = f"{tr.size}px" + (f" + {tr.lowres_size}px low-res" if tr.lowres_size else "")
            loader_tab.add(p, "png 64x64" if "png" in p else "jpeg 512x384", out, w,
                           statistics.median(v), min(v), max(v))
            raw["loader"][f"{p}/w{w}"] = v
        loader_tab.notes += [
            f"{machine['cpu_count']} CPU cores; DataLoader workers run 1 torch thread each; "
            "the main process only collates",
            "shards are in the page cache (read once before timing): decode + transform cost, not disk",
        ]
        tables = [loader_tab]

        if not args.no_train:
            train_tab = harness.Table(
                "Training demand on this CPU vs the loader",
                ["preset", "resolution", "batch", "step s", "images/s demanded",
                 "loader images/s (2 workers, same path)", "loader / demand",
                 "step s fed by loader (1 worker)", "slowdown vs fixed batch"])
            cases = [("tiny-base32", "base32 png", 16), ("tiny-sr64", None, 16),
                     ("base64-small", "base64 png", 16)]
            if args.quick:
                cases = cases[:1]
            for preset, path, tb in cases:
                try:
                    step, res, low = _train_step_fn(preset, tb)
                except Exception as e:  # models are another package's work: report, go on
                    train_tab.notes.append(f"{preset}: not measured ({type(e).__name__}: {e})")
                    continue
                fixed = torch.rand(tb, 3, res, res) * 2 - 1
                low_img = torch.rand(tb, 3, low, low) * 2 - 1 if low else None
                if path is None:      # the SR demo stage: crop 64 of the 64 px shapes + 32 low-res
                    src, tr = tmp / "shapes", transform_for_stage(64, 32, resize=0)
                    path_rate = statistics.median(
                        _loader_rate(StreamDataset(src, tr, seed=1), tb, 2, n_batches, min_s) for _ in range(rounds))
                else:
                    src, tr = paths[path]
                    path_rate = statistics.median(samples[(path, 2)])
                ds = StreamDataset(src, tr, seed=2, shuffle_buffer=64)
                it = iter(make_loader(ds, tb, num_workers=1))
                for _ in range(2):                                 # warm-up, both ways
                    step(fixed, low_img)
                    b = next(it)
                    step(b["image"], b.get("lowres"))
                fixed_t, fed_t = [], []
                for _ in range(3 if args.quick else 7):            # interleaved: load hits both alike
                    t0 = time.perf_counter()
                    step(fixed, low_img)
                    fixed_t.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    b = next(it)
                    step(b["image"], b.get("lowres"))
                    fed_t.append(time.perf_counter() - t0)
                del it
                step_s, fed_s = statistics.median(fixed_t), statistics.median(fed_t)
                demand = tb / step_s
                train_tab.add(preset, f"{res}" + (f" (from {low})" if low else ""), tb, step_s, demand,
                              path_rate, path_rate / demand, fed_s, fed_s / step_s)
                raw["train"][preset] = dict(step_s=fixed_t, demand=demand, loader=path_rate, fed_step_s=fed_t)
            train_tab.notes += [
                "demand = batch / (forward + MSE + backward + AdamW step) with the default op backend",
                "slowdown: median step time when each batch comes from a 1-worker loader on the same "
                "cores, over that on a fixed in-memory batch, steps interleaved (1.0 = the loader "
                "costs training nothing)",
            ]
            tables.append(train_tab)
    watch.stop()
    machine.update(watch.fields())
    path = harness.write_results(args.results_dir, args.out, machine, tables, raw)
    for t in tables:
        print(t.markdown())
    print(f"written {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
