"""`imagen-fast eval ...`: the paper's evaluation instruments. Wire into the main parser
with ``add_eval_parser(subparsers)``; each subcommand sets ``func(args) -> exit status``.

    imagen-fast eval drawbench --model SPEC [--model SPEC ...] --out DIR [--num-images 4]
    imagen-fast eval fid   --weights FILE (--coco DIR --model SPEC [--num 30000] | --images DIR --ref DIR)
    imagen-fast eval clip  --clip DIR (--samples DIR | --model SPEC --coco DIR [--num N])
    imagen-fast eval sweep --model SPEC --weights FILE --clip DIR --coco DIR --guidance 1,2,4,8 --out DIR
    imagen-fast eval serve --db FILE [--samples DIR] [--port 8000] | --db FILE --report
    imagen-fast eval shapes [--checkpoint DIR]   (see shapes.py)
    imagen-fast eval sr [--checkpoint DIR] [--stage -1] [--num 200]   (see superres.py)

SPEC is ``"PATH [key=value ...] [label=NAME]"``: a cascade directory (or ``builtin``) and
sampling settings (guidance, steps, sampler, threshold, percentile, aug_level; one value
or a JSON per-stage list). Mistakes a user can make (a missing file, a bad value) print
one line and return 2.
"""
from __future__ import annotations

import argparse
import json
import sys

_USER_ERRORS = (ValueError, OSError, ImportError, KeyError)


def _fail(e: BaseException) -> int:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, KeyError):
        msg = f"missing key {msg}"
    print(f"imagen-fast: error: {msg}", file=sys.stderr)
    return 2


def _guarded(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except _USER_ERRORS as e:
            return _fail(e)
    return run


def _floats(text: str):
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _names(text: str):
    return [x.strip() for x in text.split(",") if x.strip()]


def _systems(args):
    from .generator import parse_system
    return [parse_system(spec, device=args.device, dtype=args.dtype) for spec in args.model]


def _extractor(args):
    from .fid import FeatureExtractor
    return FeatureExtractor.inception(args.weights, device=args.device,
                                      batch_size=args.feature_batch_size,
                                      input_size=args.feature_input_size)


def _clip(args):
    from .clip_score import CLIPScorer
    return CLIPScorer(args.clip, device=args.device)


def _emit(args, result: dict, summary: str) -> int:
    print(json.dumps(result, indent=1, default=str) if args.json else summary)
    return 0


@_guarded
def cmd_drawbench(args) -> int:
    from .drawbench import load_prompts, run_drawbench
    prompts = load_prompts(args.prompts, _names(args.categories) if args.categories else None)
    index = run_drawbench(_systems(args), args.out, num_images=args.num_images, prompts=prompts,
                          seed=args.seed, batch_size=args.batch_size, overwrite=args.overwrite,
                          progress=not args.quiet)
    print(f"wrote {len(prompts)} prompts x {args.num_images} images x {len(args.model)} "
          f"system(s); open {index}")
    return 0


@_guarded
def cmd_fid(args) -> int:
    from .fid import fid_coco, fid_of_folders
    if args.images or args.ref:
        if not (args.images and args.ref):
            raise ValueError("--images and --ref go together (FID of one folder against another)")
        r = fid_of_folders(args.images, args.ref, _extractor(args), size=args.size or None,
                           cache_dir=args.cache_dir)
        return _emit(args, r, f"FID {r['fid']:.4f} ({r['num_a']} vs {r['num_b']} images)")
    if not args.coco or not args.model:
        raise ValueError("give --coco DIR and --model SPEC (FID-30K), or --images and --ref")
    if len(args.model) != 1:
        raise ValueError("--model: give one system (run the command once per system)")
    from .coco import load_coco
    coco = load_coco(args.coco, captions=args.captions, images=args.coco_images)
    extractor = _extractor(args)
    clip = _clip(args) if args.clip else None
    system = _systems(args)[0]
    r = fid_coco(system, coco, extractor, num=args.num, size=args.size or 256, seed=args.seed,
                 batch_size=args.batch_size, samples_dir=args.samples_dir,
                 cache_dir=args.cache_dir, clip_scorer=clip, overwrite=args.overwrite,
                 progress=not args.quiet)
    extra = f", CLIP score {r['clip_score']:.3f}" if "clip_score" in r else ""
    cached = "cached" if r["reference"]["was_cached"] else "computed"
    return _emit(args, r, f"FID-{r['num']}: {r['fid']:.4f}{extra} ({system.label}; {r['size']} px; "
                          f"reference {r['reference']['num_images']} images, {cached})")


@_guarded
def cmd_clip(args) -> int:
    from .clip_score import score_manifest
    if args.samples:
        from .manifest import read_manifest
        manifest = read_manifest(args.samples)
        scorer = _clip(args)
        r = score_manifest(scorer, manifest, _names(args.system) if args.system else None)
        lines = [f"{label}: CLIP score {v['clip_score']:.3f} ({v['num']} images)" for label, v in r.items()]
        return _emit(args, {"clip_model": scorer.identity, "systems": r}, "\n".join(lines))
    if not (args.model and args.coco):
        raise ValueError("give --samples DIR, or --model SPEC with --coco DIR")
    from .coco import load_coco
    from .samples import generate, tqdm_progress
    coco = load_coco(args.coco, captions=args.captions, images=args.coco_images)
    scorer = _clip(args)
    out = {}
    for system in _systems(args):
        prompts = [c for _, c in coco.sample(args.num, args.seed)]
        scores = []
        for idx, images in generate(system, prompts, seed=args.seed, batch_size=args.batch_size,
                                    progress=tqdm_progress(len(prompts), system.label, not args.quiet)):
            scores.extend(scorer.score(images, [prompts[i] for i in idx]).tolist())
        out[system.label] = {"clip_score": sum(scores) / len(scores), "num": len(scores)}
    lines = [f"{label}: CLIP score {v['clip_score']:.3f} ({v['num']} captions)" for label, v in out.items()]
    return _emit(args, {"clip_model": scorer.identity, "systems": out}, "\n".join(lines))


@_guarded
def cmd_sweep(args) -> int:
    from .coco import load_coco
    from .sweep import run_sweep
    if len(args.model) != 1:
        raise ValueError("--model: the sweep takes one system")
    coco = load_coco(args.coco, captions=args.captions, images=args.coco_images)
    extractor, clip = _extractor(args), _clip(args)
    stage = None if args.stage == "all" else int(args.stage)
    r = run_sweep(_systems(args)[0], args.guidance, coco, extractor, clip, out_dir=args.out,
                  stage=stage, num=args.num, size=args.size or 256, seed=args.seed,
                  batch_size=args.batch_size, cache_dir=args.cache_dir,
                  keep_samples=args.keep_samples, progress=not args.quiet)
    lines = [f"w={p['guidance']:g}: FID {p['fid']:.4f}, CLIP score {p['clip_score']:.3f}"
             for p in r["points"]]
    return _emit(args, r, "\n".join(lines + [f"plot: {r['plot']}"]))


@_guarded
def cmd_serve(args) -> int:
    from . import serve as rating
    config = None
    if args.samples:
        config = rating.StudyConfig(
            tasks=_names(args.tasks), compare=_names(args.compare) if args.compare else None,
            align=_names(args.align) if args.align else None, batch_size=args.batch_size,
            control_every=args.control_every, min_control_accuracy=args.min_control_accuracy,
            seed=args.seed)
    store = rating.open_study(args.db, args.samples, config)
    if args.report:
        rep = rating.build_report(store)
        return _emit(args, rep, rating.format_report(rep))
    from .serve.app import serve
    serve(store, args.host, args.port)
    return 0


def _common(s, *, model=True, model_required=False):
    if model:
        s.add_argument("--model", action="append", default=[] if not model_required else None,
                       required=model_required, metavar="SPEC",
                       help="'PATH [key=value ...] [label=NAME]' (repeatable)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the pipeline's)")
    s.add_argument("--dtype", default=None, help="model weights: fp32, bf16, fp16")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=8, help="prompts sampled per call")
    s.add_argument("--json", action="store_true", help="print the full result as JSON")
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def _coco_args(s, required=False):
    s.add_argument("--coco", required=required, help="COCO-format directory "
                   "(annotations/captions_*.json + images)")
    s.add_argument("--captions", default=None, help="the captions JSON, if not found under --coco")
    s.add_argument("--coco-images", default=None, help="the image folder, if not found under --coco")


def _fid_args(s, required=True):
    s.add_argument("--weights", required=required,
                   help="Inception 2015-12-05 weights (pt_inception-2015-12-05-*.pth or .safetensors)")
    s.add_argument("--cache-dir", default=None,
                   help="reference statistics cache (default ~/.cache/imagen-fast/fid; '' disables)")
    s.add_argument("--feature-batch-size", type=int, default=32)
    s.add_argument("--feature-input-size", type=int, default=299,
                   help="Inception input size; anything but 299 is for smoke runs only")
    s.add_argument("--size", type=int, default=None, help="sample/reference size (FID-30K: 256)")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` and its subcommands on an argparse subparsers object."""
    p = subparsers.add_parser("eval", help="evaluation: DrawBench, FID-30K, CLIP score, "
                                           "guidance sweep, human rating app")
    sub = p.add_subparsers(dest="eval_command", required=True)

    s = sub.add_parser("drawbench", help="DrawBench contact sheets, systems side by side")
    _common(s, model_required=True)
    s.add_argument("--out", required=True, help="output folder (index.html, one page per category)")
    s.add_argument("--num-images", type=int, default=4, help="images per prompt and system")
    s.add_argument("--categories", default=None, help="comma-separated subset (default: all 11)")
    s.add_argument("--prompts", default=None, help="another Prompt,Category CSV")
    s.add_argument("--overwrite", action="store_true", help="resample into an --out of another run")
    s.set_defaults(func=cmd_drawbench)

    s = sub.add_parser("fid", help="FID-30K on a COCO-format directory, or FID of two folders")
    _common(s)
    _fid_args(s)
    _coco_args(s)
    s.add_argument("--num", type=int, default=30000, help="captions sampled (FID-30K: 30000)")
    s.add_argument("--samples-dir", default=None, help="keep the samples here (resumable; "
                   "its manifest feeds `eval clip --samples` and `eval serve`)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--clip", default=None, help="also the CLIP score of the samples (model dir)")
    s.add_argument("--images", default=None, help="folder of images to score (with --ref)")
    s.add_argument("--ref", default=None, help="reference folder (statistics cached)")
    s.set_defaults(func=cmd_fid)

    s = sub.add_parser("clip", help="CLIP score of a samples folder or of fresh samples")
    _common(s)
    _coco_args(s)
    s.add_argument("--clip", required=True, help="CLIP model directory (transformers save_pretrained)")
    s.add_argument("--samples", default=None, help="a folder with manifest.json (drawbench, fid)")
    s.add_argument("--system", default=None, help="only these systems of --samples (comma-separated)")
    s.add_argument("--num", type=int, default=1000, help="COCO captions to sample with --model")
    s.set_defaults(func=cmd_clip)

    s = sub.add_parser("sweep", help="guidance sweep: CLIP score vs FID curve (PNG)")
    _common(s, model_required=True)
    _fid_args(s)
    _coco_args(s, required=True)
    s.add_argument("--clip", required=True, help="CLIP model directory")
    s.add_argument("--guidance", type=_floats, required=True, help="weights, e.g. 1,1.5,2,3,5,8")
    s.add_argument("--stage", default="0", help="stage index that gets the weight, or 'all'")
    s.add_argument("--num", type=int, default=1000, help="COCO captions per point")
    s.add_argument("--out", required=True, help="output folder (sweep.json, sweep.png)")
    s.add_argument("--keep-samples", action="store_true", help="keep each point's samples (resumable)")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("serve", help="local web app for human rating; --report for the results")
    s.add_argument("--db", required=True, help="SQLite file of the study (created on first start)")
    s.add_argument("--samples", default=None, help="folder with manifest.json to build the study from")
    s.add_argument("--tasks", default="photorealism,caption_ab,alignment")
    s.add_argument("--compare", default=None, help="the two systems of the A/B questions "
                                                   "(default: the manifest's first two)")
    s.add_argument("--align", default=None, help="systems asked about alone (default: --compare)")
    s.add_argument("--batch-size", type=int, default=50, help="questions per rater batch")
    s.add_argument("--control-every", type=int, default=5, help="one control per this many questions")
    s.add_argument("--min-control-accuracy", type=float, default=0.8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--report", action="store_true", help="print the results and exit")
    s.add_argument("--json", action="store_true", help="with --report: JSON")
    s.set_defaults(func=cmd_serve)

    from .shapes import add_shapes_eval_parser
    from .superres import add_sr_eval_parser
    add_shapes_eval_parser(sub)
    add_sr_eval_parser(sub)
    return p

