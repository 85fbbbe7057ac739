"""The training tests' tiny model and run helpers (torch and JAX trainers alike)."""
import json
from pathlib import Path

# A very small base model so a step takes a fraction of a second on 2 cores.
TINY_MODEL = {"preset": "tiny-base32", "overrides": {"image_size": 16, "model_channels": 16,
                                                     "channel_mult": [1, 2], "attn_resolutions": [8],
                                                     "text_dim": 16, "context_dim": 16, "emb_dim": 32,
                                                     "groups": 4, "head_dim": 8}}


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
