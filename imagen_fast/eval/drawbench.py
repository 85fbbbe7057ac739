"""DrawBench (Saharia et al. 2022, section 4.3): 200 prompts in 11 categories, N images
per prompt from each system compared, written as a static HTML contact sheet per
category (systems side by side, one row per prompt) that any browser opens from disk.

    out/index.html                  categories, systems and their settings
    out/<category>.html             one row per prompt, one column per system
    out/images/<i>-<label>/PPP_K.png  image K of prompt PPP from system i
    out/manifest.json               what was generated (read by `eval clip` and `eval serve`)

Every system sees the same seeds (``samples.generate``: batch c gets seed + c over the
same prompt order), so the columns differ by the model or settings, not by the noise.
A rerun into the same folder with the same systems reuses the images already there.
"""
from __future__ import annotations

import csv
import html
import os
import re
from dataclasses import dataclass
from importlib import resources
from typing import Dict, List, Optional, Sequence

from .generator import System
from .manifest import write_manifest
from .samples import SampleDir, generate, tqdm_progress

# The categories of the paper's Table A.1, with their prompt counts.
CATEGORY_COUNTS = {"Colors": 25, "Conflicting": 10, "Counting": 19, "DALL-E": 20,
                   "Descriptions": 20, "Gary Marcus et al.": 10, "Misspellings": 10,
                   "Positional": 20, "Rare Words": 7, "Reddit": 38, "Text": 21}


@dataclass(frozen=True)
class Prompt:
    index: int      # row in the CSV, 0-based
    text: str
    category: str


def load_prompts(path: Optional[str] = None, categories: Optional[Sequence[str]] = None
                 ) -> List[Prompt]:
    """The prompts of a ``Prompt,Category`` CSV (default: the 200 DrawBench prompts shipped
    with the package), optionally only some categories (matched case-insensitively).
    Category names are stripped of surrounding spaces. An empty result raises ValueError."""
    if path is None:
        text = resources.files("imagen_fast.eval").joinpath("data/drawbench.csv").read_text("utf-8")
        source = "the built-in DrawBench prompts"
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file not found: {path}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        source = path
    rows = list(csv.DictReader(text.splitlines()))
    if rows and not {"Prompt", "Category"} <= set(rows[0]):
        raise ValueError(f"{source}: needs the columns Prompt and Category, has {list(rows[0])}")
    prompts = [Prompt(i, r["Prompt"].strip(), (r["Category"] or "").strip())
               for i, r in enumerate(rows) if (r.get("Prompt") or "").strip()]
    if categories:
        known = {p.category.lower(): p.category for p in prompts}
        unknown = [c for c in categories if c.strip().lower() not in known]
        if unknown:
            raise ValueError(f"categories: {unknown} not in {source} (has: "
                             f"{', '.join(dict.fromkeys(p.category for p in prompts))})")
        wanted = {c.strip().lower() for c in categories}
        prompts = [p for p in prompts if p.category.lower() in wanted]
    if not prompts:
        raise ValueError(f"no prompts in {source}")
    return prompts


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "x"


def run_drawbench(systems: Sequence[System], out_dir: str, *, num_images: int = 4,
                  prompts: Optional[Sequence[Prompt]] = None, seed: int = 0, batch_size: int = 8,
                  overwrite: bool = False, progress: bool = False) -> str:
    """Sample every system on every prompt and write the contact sheets; returns the
    index.html path."""
    systems = list(systems)
    if not systems:
        raise ValueError("systems: need at least one system")
    labels = [s.label for s in systems]
    if len(set(labels)) != len(labels):
        raise ValueError(f"systems: labels must differ, got {labels}")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images: expected a positive int, got {num_images!r}")
    prompts = list(prompts) if prompts is not None else load_prompts()
    if not prompts:
        raise ValueError("no prompts to sample")
    jobs = [(p, k) for p in prompts for k in range(num_images)]
    names = [f"{p.index:03d}_{k}" for p, k in jobs]
    texts = [p.text for p, _ in jobs]
    os.makedirs(out_dir, exist_ok=True)
    files: Dict[str, Dict[int, List[str]]] = {}
    for i, system in enumerate(systems):
        sub = os.path.join("images", f"{i}-{_slug(system.label)}")
        store = SampleDir(os.path.join(out_dir, sub), names,
                          {"system": system.describe(), "seed": seed, "batch_size": batch_size,
                           "prompts": texts}, overwrite=overwrite)
        for _ in generate(system, texts, seed=seed, batch_size=batch_size, sample_dir=store,
                          progress=tqdm_progress(len(jobs), system.label, progress)):
            pass
        per_prompt = files.setdefault(system.label, {})
        for j, (p, _) in enumerate(jobs):
            per_prompt.setdefault(p.index, []).append(
                os.path.relpath(store.path_of(j), out_dir).replace(os.sep, "/"))
    items = [{"id": str(p.index), "caption": p.text, "category": p.category,
              "images": {label: files[label][p.index] for label in labels}} for p in prompts]
    write_manifest(out_dir, [s.describe() for s in systems], items)
    return write_contact_sheets(out_dir, [s.describe() for s in systems], items)


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:6px;vertical-align:top}
th{background:#f4f4f4;position:sticky;top:0}td.prompt{max-width:22em}
img{width:128px;height:128px;object-fit:contain;margin:2px;background:#eee}
nav a{margin-right:1em}code{background:#f4f4f4;padding:0 3px}"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def _category_file(category: str) -> str:
    return f"category-{_slug(category)}.html"


def write_contact_sheets(out_dir: str, systems: List[dict], items: List[dict]) -> str:
    """index.html + one page per category from manifest-style systems and items."""
    labels = [s["label"] for s in systems]
    cats = list(dict.fromkeys(it["category"] for it in items))
    for ci, cat in enumerate(cats):
        nav = ['<a href="index.html">all categories</a>']
        if ci > 0:
            nav.append(f'<a href="{_category_file(cats[ci - 1])}">&larr; {html.escape(cats[ci - 1])}</a>')
        if ci + 1 < len(cats):
            nav.append(f'<a href="{_category_file(cats[ci + 1])}">{html.escape(cats[ci + 1])} &rarr;</a>')
        head = "".join(f"<th>{html.escape(lb)}</th>" for lb in labels)
        rows = []
        for it in (x for x in items if x["category"] == cat):
            cells = []
            for lb in labels:
                imgs = "".join(f'<a href="{html.escape(p)}"><img src="{html.escape(p)}" alt="" '
                               f'loading="lazy"></a>' for p in it["images"].get(lb, []))
                cells.append(f"<td>{imgs}</td>")
            rows.append(f'<tr><td class="prompt">#{html.escape(it["id"])}: '
                        f'{html.escape(it["caption"])}</td>{"".join(cells)}</tr>')
        n = sum(1 for x in items if x["category"] == cat)
        body = (f"<nav>{''.join(nav)}</nav><h1>DrawBench: {html.escape(cat)} ({n} prompts)</h1>"
                f"<table><tr><th>prompt</th>{head}</tr>\n" + "\n".join(rows) + "</table>")
        with open(os.path.join(out_dir, _category_file(cat)), "w", encoding="utf-8") as f:
            f.write(_page(f"DrawBench: {cat}", body))
    sys_rows = "".join(
        f"<tr><td>{html.escape(s['label'])}</td><td><code>{html.escape(str(s.get('spec') or ''))}"
        f"</code></td><td><code>{html.escape(str(s.get('settings') or {}))}</code></td></tr>"
        for s in systems)
    cat_rows = "".join(
        f'<tr><td><a href="{_category_file(c)}">{html.escape(c)}</a></td>'
        f"<td>{sum(1 for x in items if x['category'] == c)}</td></tr>" for c in cats)
    n_img = sum(len(v) for it in items for v in it["images"].values())
    body = (f"<h1>DrawBench contact sheets</h1><p>{len(items)} prompts, {len(systems)} "
            f"system(s), {n_img} images.</p><h2>Systems</h2><table><tr><th>label</th>"
            f"<th>checkpoint</th><th>settings</th></tr>{sys_rows}</table><h2>Categories</h2>"
            f"<table><tr><th>category</th><th>prompts</th></tr>{cat_rows}</table>")
    index = os.path.join(out_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write(_page("DrawBench", body))
    return index
