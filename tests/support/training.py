"""The training tests' tiny model and run helpers (torch and JAX trainers alike)."""
import json
from pathlib import Path

# A very small base model so a step takes a fraction of a second on 2 cores.
TINY_MODEL = {"preset": "tiny-base32", "overrides": {"image_size": 16, "model_channels": 16,
                                                     "channel_mult": [1, 2], "attn_resolutions": [8],
                                                     "text_dim": 16, "context_dim": 16, "emb_dim": 32,
                                                     "groups": 4, "head_dim": 8}}


def tiny_run(out_dir, steps=6, **train):
    """A raw config dict: TINY_MODEL on 16 px shapes with hashed text, checkpoints every
    2 steps; ``train`` keys override the [train] section."""
    return {
        "model": TINY_MODEL,
        "data": {"kind": "shapes", "path": "shapes:64:3", "resolution": 16},
        "text": {"encoder": "hash:16", "max_length": 16},
        "train": {"steps": steps, "batch_size": 4, "warmup_steps": 2, "lr": 1e-3, "seed": 11,
                  "ema_decay": 0.9, **train},
        "log": {"out_dir": str(out_dir), "log_every": 1, "ckpt_every": 2, "keep": 2,
                "progress": False, "tensorboard": False},
    }


def losses(run_dir):
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return {json.loads(ln)["step"]: json.loads(ln)["loss"] for ln in lines if ln.strip()}


def write_config(path, raw):
    def val(v):
        return json.dumps(v) if not isinstance(v, dict) else \
            "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {val(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
