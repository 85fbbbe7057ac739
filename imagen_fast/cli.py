"""The `imagen-fast` command.

Subcommands import what they need when they run, so `imagen-fast info` starts fast.
Errors a user can cause end in a one-line message and exit status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import List, Optional


class UsageError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit 2."""


def _versions() -> dict:
    import torch

    import imagen_fast

    out = {"imagen_fast": imagen_fast.__version__, "python": platform.python_version(),
           "torch": torch.__version__}
    from importlib import metadata

    # Installed versions, read without importing (importing jax would start its runtime).
    for name in ("triton", "numpy", "jax", "flax", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def info_dict() -> dict:
    import torch

    from imagen_fast import ops
    from imagen_fast._compiled import extension_error, load_extension

    C = load_extension()
    compiled = {"available": C is not None}
    backends = ops.available_backends()   # loads the cpu backend, which applies IMAGEN_FAST_CPU_ISA
    if C is None:
        compiled["error"] = extension_error()
    else:
        compiled.update(C.build_info())
        if C.HAS_CUDA:
            compiled["cuda_runtime"] = C.cuda_runtime_version()
            compiled["cuda_driver"] = C.cuda_driver_version()
            compiled["cuda_devices"] = [C.cuda_device_info(i) for i in range(C.cuda_device_count())]
    devices = [{"device": "cpu", "threads": torch.get_num_threads()}]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append({"device": f"cuda:{i}", "name": p.name,
                        "capability": f"{p.major}.{p.minor}", "memory_gb": round(p.total_memory / 2**30, 1)})
    return {"versions": _versions(), "compiled": compiled, "backends": backends,
            "requested_backend": ops.requested_backend(), "devices": devices}


def cmd_info(args) -> int:
    info = info_dict()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print("imagen-fast " + info["versions"]["imagen_fast"])
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if k != "imagen_fast"))
    c = info["compiled"]
    if c["available"]:
        print(f"compiled module: {c['compiler']}; OpenMP {c['openmp']} ({c['openmp_max_threads']} threads); "
              f"CUDA {'archs ' + c['cuda_archs'] if c['cuda'] else 'not built'}")
        others = ", ".join(f"{k} {v}" for k, v in c["cpu_kernel_variants"].items() if k != c["cpu_kernels"])
        print(f"CPU kernels: {c['cpu_kernels']} path ({'/'.join(c['cpu_isa'])}) active; "
              f"{others} (IMAGEN_FAST_CPU_ISA={os.environ.get('IMAGEN_FAST_CPU_ISA', 'auto')})")
    else:
        print(f"compiled module: NOT AVAILABLE ({c['error']}); ops run on the torch reference")
    print("backends:")
    for name, status in info["backends"].items():
        print(f"  {name:7s} {status}")
    print("devices: " + "; ".join(", ".join(f"{k}={v}" for k, v in d.items()) for d in info["devices"]))
    return 0


def _gpu_compile_audit(args) -> int:
    """The GPU compile audit lives in a source checkout (benchmarks/gpu_compile.py): it
    compiles csrc/cuda too, and its report is the repository's."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "gpu_compile.py").is_file() or not (root / "csrc").is_dir():
        raise UsageError("bench gpu-compile runs from a source checkout (it audits csrc/ too): "
                         "clone the repository and run `make gpu-compile` there")
    sys.path.insert(0, str(root))
    from benchmarks import gpu_compile
    extra = ["--subset", args.subset, "--targets", args.targets] + (["--check"] if args.check else [])
    return gpu_compile.main(extra + (["--device-run"] if args.device == "cuda" else []))


def cmd_bench(args) -> int:
    """The benchmarks ship in imagen_fast.bench; results go to --out (default
    ./bench-results), never into the installed package."""
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible to torch")
    if args.what == "shapes":
        from .bench import shapes
        shapes.main([])
        return 0
    if args.what == "gpu-compile":
        return _gpu_compile_audit(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {args.out!r} is not a directory")
    from .bench import harness
    harness.set_allocator_env()        # re-executes this command with fixed allocator settings
    extra = ["--device", args.device, "--results-dir", str(out)] + (["--quick"] if args.quick else [])
    status = 0
    if args.what in ("ops", "all"):
        from .bench import bench_ops
        status |= bench_ops.main(extra)
    if args.what in ("model", "all"):
        from .bench import bench_model
        status |= bench_model.main(extra)
    if args.what in ("compile", "all"):
        from .bench import bench_compile
        status |= bench_compile.main(extra)
    return status


def cmd_presets(args) -> int:
    from imagen_fast.models import describe_presets

    rows = describe_presets()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['name']:24s} {r['stage']:6s} {r['resolution']:>5} px  "
                  f"{r['params'] / 1e6:10.2f} M params")
    return 0


def cmd_train(args) -> int:
    import logging

    from .checkpoint import CheckpointError
    from .train import Trainer
    from .train_config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.set)
        if args.backend == "jax":
            try:
                from .jax.train import JaxTrainer
            except ImportError as e:
                raise UsageError(f"--backend jax needs JAX and Flax: pip install "
                                 f"'imagen-fast[jax]' ({e})") from None
            trainer = JaxTrainer(cfg, resume=args.resume)
        else:
            trainer = Trainer(cfg, resume=args.resume)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    summary = trainer.run()
    print(json.dumps(summary))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): `imagen-fast: error: ...`, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="imagen-fast", description="Imagen with fast custom kernels.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("info", help="versions, compiled features, backends, devices")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("bench", help="benchmarks of the ops and models (results under --out, default ./bench-results)",
                       description="Benchmarks of the ops and models. Results (JSON, markdown, PNG with "
                                   "matplotlib) go to --out; the repository's committed results are "
                                   "written with --out benchmarks/results from a checkout.")
    s.add_argument("what", choices=["ops", "model", "compile", "all", "shapes", "gpu-compile"], nargs="?",
                   default="ops",
                   help="ops: every op over the shape table; model: every preset's training and "
                        "sampling vs imagen-pytorch; compile: eager vs torch.compile'd sampling "
                        "and training steps; shapes: print the shape table; gpu-compile (from a source "
                        "checkout): the ahead-of-time GPU compile audit of every Triton kernel for "
                        "sm_80/sm_90 and of csrc/cuda, no GPU needed (report in benchmarks/results/"
                        "gpu_compile.md; with --device cuda: launch each config on this GPU)")
    s.add_argument("--quick", action="store_true", help="a short smoke run (under 2 minutes on CPU)")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    from .bench import DEFAULT_RESULTS          # the package's __init__: no torch import
    s.add_argument("--out", default=str(DEFAULT_RESULTS), metavar="DIR",
                   help=f"results directory (default ./{DEFAULT_RESULTS}; created if missing)")
    s.add_argument("--subset", choices=["full", "ci"], default="full",
                   help="gpu-compile: the whole shape table (hours on 2 cores, cached) or the CI subset")
    s.add_argument("--targets", default="80,90", help="gpu-compile: compute capabilities")
    s.add_argument("--check", action="store_true", help="gpu-compile: exit 1 on any rule violation")
    s.set_defaults(func=cmd_bench)
    s = sub.add_parser("train", help="train one stage of the cascade from a TOML config")
    s.add_argument("--config", required=True, help="TOML file (see imagen_fast/train_config.py)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    s.add_argument("--backend", choices=["torch", "jax"], default="torch",
                   help="torch (CPU/CUDA, torchrun) or jax (TPU/GPU/CPU, sharded over a mesh)")
    s.set_defaults(func=cmd_train)
    from .data.cli import add_data_parser
    add_data_parser(sub)
    from .export import add_export_parser
    from .sample_cli import add_sample_parser
    add_sample_parser(sub)
    add_export_parser(sub)
    from .eval.cli import add_eval_parser
    add_eval_parser(sub)
    s = sub.add_parser("presets", help="model presets with their parameter counts")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_presets)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"imagen-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
