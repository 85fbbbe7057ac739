"""Tables and files of the GPU compile audit (benchmarks/gpu_compile.py): pure functions
of its result rows, one row per (target, specialisation):

    target (80 | 90), kernel, config, role (fixed | default | candidate), cases, group,
    smem_limit, ok, error, regs, stack, spill_stores, spill_loads, shared, seconds

Files: results/gpu_compile.md (summary, rule violations, before/after, csrc/cuda, the
per-kernel table per target, the heaviest configurations of every kernel) and
results/gpu_compile.json (the same, compact, plus the CI picks: the shape-table cases
whose configs use the most registers, which tests/ops/test_gpu_compile.py recompiles).
Every row goes to results/gpu_compile_configs.json (not committed: tens of MB).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

ROLES = ("fixed", "default", "candidate")


def spills(r: Dict) -> bool:
    return bool(r["ok"]) and (r["spill_stores"] > 0 or r["spill_loads"] > 0)


def launched(r: Dict) -> bool:
    """Runs untuned: a fixed launch or a tuned op's default."""
    return r["role"] != "candidate"


def problems(rows: Sequence[Dict]) -> List[str]:
    """The rules: every config compiles and fits the card's shared memory per block;
    a fixed or default config does not spill (a candidate may: the tuner times it)."""
    out = []
    for r in rows:
        where = f"sm_{r['target']} {r['kernel']} [{r['config']}] ({r['cases'][0]})"
        if not r["ok"]:
            out.append(f"{where}: does not compile: {r['error']}")
        elif r["shared"] > r["smem_limit"]:
            out.append(f"{where}: {r['shared']} B shared memory > {r['smem_limit']} B per block")
        elif spills(r) and launched(r):
            out.append(f"{where}: {r['role']} config spills {r['spill_stores']} B stores / "
                       f"{r['spill_loads']} B loads")
    return out


def cuda_problems(cuda: Dict) -> List[str]:
    out = []
    for f in cuda.get("files", []):
        if not f["ok"]:
            out.append(f"csrc/cuda/{f['file']} {f['arch']}: does not compile: {f['error']}")
        for fn in f["functions"]:
            if fn["spill_stores"] or fn["spill_loads"]:
                out.append(f"csrc/cuda/{f['file']} {f['arch']} {fn['function']}: spills "
                           f"{fn['spill_stores']}/{fn['spill_loads']} B")
    return out


def not_compiled(cov: Dict) -> List[str]:
    """What a partial (--cached-only) audit has not compiled, per target and kernel."""
    return [f"sm_{cap} {k}: {c[0] - c[1]} of {c[0]} launched and {c[2] - c[3]} of {c[2]} "
            "candidate configs not compiled yet"
            for cap, ks in sorted(cov.items()) for k, c in sorted(ks.items())
            if c[1] < c[0] or c[3] < c[2]]


def coverage_totals(cov: Dict, cap: int) -> List[int]:
    """[launched, launched compiled, candidates, candidates compiled] of one target."""
    return [sum(c[i] for c in cov.get(str(cap), {}).values()) for i in range(4)]


def summary(rows: Sequence[Dict], cap: int) -> Dict:
    """Counts for one target: what the before/after table and the summary show."""
    mine = [r for r in rows if r["target"] == cap]
    ok = [r for r in mine if r["ok"]]
    run = [r for r in mine if launched(r)]
    worst = max(ok, key=lambda r: r["spill_stores"], default=None)
    worst_run = max((r for r in run if spills(r)), key=lambda r: r["spill_stores"], default=None)
    where = lambda r: f"{r['kernel']} [{r['config']}]" if r and r["spill_stores"] else ""  # noqa: E731
    return dict(configs=len(mine), launched=len(run), failures=len(mine) - len(ok),
                launched_failures=sum(not r["ok"] for r in run),
                over_smem=sum(r["shared"] > r["smem_limit"] for r in ok),
                spilling_launched=sum(spills(r) for r in run),
                spilling_candidates=sum(spills(r) for r in mine if not launched(r)),
                largest_spill=worst["spill_stores"] if worst else 0, largest_spill_at=where(worst),
                largest_launched_spill=worst_run["spill_stores"] if worst_run else 0,
                largest_launched_spill_at=where(worst_run),
                max_regs=max((r["regs"] for r in ok), default=0),
                max_shared=max((r["shared"] for r in ok), default=0))


def kernel_rows(rows: Sequence[Dict], cap: int) -> List[Dict]:
    """Per kernel on one target: configs, failures, registers, spills, shared memory."""
    kernels: Dict[str, List[Dict]] = {}
    for r in rows:
        if r["target"] == cap:
            kernels.setdefault(r["kernel"], []).append(r)
    out = []
    for k in sorted(kernels):
        rs = kernels[k]
        ok = [r for r in rs if r["ok"]]
        run = [r for r in rs if launched(r)]
        out.append(dict(kernel=k, launched=len(run), candidates=len(rs) - len(run),
                        failures=len(rs) - len(ok), max_regs=max((r["regs"] for r in ok), default=0),
                        spilling_launched=sum(spills(r) for r in run),
                        spilling_candidates=sum(spills(r) for r in rs if not launched(r)),
                        largest_spill=max((r["spill_stores"] for r in ok), default=0),
                        max_shared=max((r["shared"] for r in ok), default=0),
                        smem_limit=rs[0]["smem_limit"]))
    return out


def heaviest(rows: Sequence[Dict], cap: int, per_kernel: int = 2) -> List[Dict]:
    """Per kernel on one target: the launched configs with the most registers (distinct
    shape-table cases) and the candidate with the most shared memory."""
    out = []
    for k in sorted({r["kernel"] for r in rows if r["target"] == cap}):
        rs = [r for r in rows if r["target"] == cap and r["kernel"] == k and r["ok"]]
        groups = set()
        for r in sorted((r for r in rs if launched(r)), key=lambda r: (-r["regs"], r["config"])):
            if r["group"] not in groups and len(groups) < per_kernel:
                groups.add(r["group"])
                out.append(r)
        cands = [r for r in rs if not launched(r)]
        if cands:
            out.append(max(cands, key=lambda r: (r["shared"], r["regs"], r["config"])))
    return out


def ci_picks(rows: Sequence[Dict], caps: Sequence[int]) -> List[Dict]:
    """What the CI test recompiles: the heaviest configs' kernel, role class and the
    shape-table case that launches them (tests/ops/test_gpu_compile.py)."""
    return [dict(target=r["target"], kernel=r["kernel"], launched=launched(r), group=r["group"],
                 config=r["config"]) for cap in caps for r in heaviest(rows, cap)]


def _kb(b: int) -> str:
    return f"{b / 1024:.1f}"


def kernel_table(krows: Sequence[Dict]) -> List[str]:
    out = ["| kernel | configs: launched + candidates | fail | max regs | spilling launched | "
           "spilling candidates | largest spill (stores, B) | max shared KB / limit |",
           "|---|---|---|---|---|---|---|---|"]
    for k in krows:
        out.append(f"| `{k['kernel']}` | {k['launched']} + {k['candidates']} | {k['failures']} | "
                   f"{k['max_regs']} | {k['spilling_launched']} | {k['spilling_candidates']} | "
                   f"{k['largest_spill']} | {_kb(k['max_shared'])} / {_kb(k['smem_limit'])} |")
    return out


def config_table(rows: Sequence[Dict]) -> List[str]:
    out = ["| kernel | config | role | compiled | regs | spill st/ld B | stack B | shared B | "
           "first launch |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = "yes" if r["ok"] else f"**no**: {r['error']}"
        out.append(f"| `{r['kernel']}` | `{r['config']}` | {r['role']} | {status} | {r['regs']} | "
                   f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['shared']} | "
                   f"{r['cases'][0]} |")
    return out


def cuda_table(cuda: Dict) -> List[str]:
    if not cuda.get("available"):
        return [f"csrc/cuda not audited: {cuda.get('reason', 'skipped')}"]
    out = [f"nvcc: {cuda['nvcc']}; the build's flags (`-O3 --expt-relaxed-constexpr -lineinfo "
           "-std=c++17`) with `-Xptxas -v`.", "",
           "| file | arch | compiled | kernels | max regs | spill st/ld B (max) | stack B (max) | "
           "static smem B (max) |", "|---|---|---|---|---|---|---|---|"]
    for f in cuda["files"]:
        fs = f["functions"]
        mx = lambda k: max((x[k] for x in fs), default=0)  # noqa: E731
        out.append(f"| {f['file']} | {f['arch']} | {'yes' if f['ok'] else '**no**: ' + f['error']} | "
                   f"{len(fs)} | {mx('regs')} | {mx('spill_stores')}/{mx('spill_loads')} | "
                   f"{mx('stack')} | {mx('smem')} |")
    return out


def before_after(before: Dict, after: Dict, caps: Sequence[int]) -> List[str]:
    """before/after: {"commit", "summary": {cap: summary(...)}} (the compact JSON)."""
    out = [f"Before: commit {before.get('commit', '?')}. {before.get('note', '')}", "",
           f"After: commit {after.get('commit', '?')}, this report. *Launched* = fixed and "
           "default configurations, what runs untuned; *compiled* = launched configs compiled "
           "of those captured (a partial audit counts only what it compiled).", "",
           "| target | | launched compiled | compile failures | over shared limit | spilling "
           "launched configs | largest launched spill (stores, B) | spilling candidates | "
           "largest spill overall (B) |", "|---|---|---|---|---|---|---|---|---|"]
    for cap in caps:
        for name, audit in (("before", before), ("after", after)):
            s = audit["summary"].get(str(cap))
            if s is None:
                continue
            cov = audit.get("coverage", {}).get(str(cap))
            done = f"{cov[1]} of {cov[0]}" if cov else str(s["launched"])
            cand = "not compiled" if audit.get("launched_only") else s["spilling_candidates"]
            overall = "-" if audit.get("launched_only") else s["largest_spill"]
            out.append(f"| sm_{cap} | {name} | {done} | {s['failures']} | {s['over_smem']} | "
                       f"{s['spilling_launched']} | {s['largest_launched_spill']}"
                       f"{' (' + s['largest_launched_spill_at'] + ')' if s['largest_launched_spill_at'] else ''} | "
                       f"{cand} | {overall} |")
    return out


def compact(audit: Dict, cuda: Dict) -> Dict:
    """The committed JSON: everything the report shows, without the per-config rows."""
    rows = audit["rows"]
    caps = [t["cap"] for t in audit["targets"]]
    cov = audit.get("coverage", {})
    return dict(commit=audit.get("commit", "?"), triton=audit["triton"], scope=audit["scope"],
                targets=audit["targets"], launched_only=audit.get("launched_only", False),
                coverage={str(c): coverage_totals(cov, c) for c in caps}, not_compiled=not_compiled(cov),
                summary={str(c): summary(rows, c) for c in caps},
                kernels={str(c): kernel_rows(rows, c) for c in caps},
                violations=problems(rows) + cuda_problems(cuda) + list(audit.get("unaudited", [])),
                heaviest={str(c): [{k: r[k] for k in ("kernel", "config", "role", "regs",
                                                      "spill_stores", "shared", "group")}
                                   for r in heaviest(rows, c)] for c in caps},
                ci_picks=ci_picks(rows, caps), cuda=cuda)


def markdown(audit: Dict, cuda: Dict, before: Optional[Dict] = None) -> str:
    rows = audit["rows"]
    targets = audit["targets"]
    caps = [t["cap"] for t in targets]
    sc = audit["scope"]
    comp = compact(audit, cuda)
    cards = " and ".join("{card} ({arch})".format(**t) for t in targets)
    lines = ["# GPU compile audit", "",
             f"Every Triton kernel launch of the package compiled ahead of time for "
             f"{cards} with triton "
             f"{audit['triton']}, commit {audit.get('commit', '?')}: `make gpu-compile` "
             "(`imagen-fast bench gpu-compile`, `python -m benchmarks.gpu_compile`). No GPU is "
             "involved: registers, spills and stack are ptxas's own report (`-v`), shared "
             "memory the kernel metadata against the card's per-block limit.", "",
             "Launches are captured from the package's host wrappers over the shape table "
             f"(`imagen_fast/bench/shapes.py`): presets {', '.join(sc['presets'])}; text lengths "
             f"{sc['text_lens']}; norm batches {sc['gn_batches']}, attention batches "
             f"{sc['attn_batches']}, image batches {sc['image_batches']}; dtypes "
             f"{', '.join(sc['dtypes'])}; NCHW and channels-last; the norm calls with and "
             "without FiLM as the models make them; attention with and without the key mask; "
             "the sampler step with and without guidance and noise, every threshold; forward "
             "and backward; every autotuner candidate. A *config* is one distinct "
             "specialisation (one binary): kernel, pointer dtypes, constexprs, integer "
             "arguments Triton specialises (equal to 1, multiple of 16), warps, stages. Roles: "
             "*fixed* (no tuner), *default* (a tuned op untuned), *candidate* (only tried by "
             "the tuner: may spill, must compile and fit).", "",
             "## Coverage", ""]
    for t in targets:
        cov = comp["coverage"][str(t["cap"])]
        cand = ("not compiled (--launched-only)" if comp["launched_only"]
                else f"{cov[3]} of {cov[2]} candidate configs")
        lines.append(f"- {t['card']} ({t['arch']}): {cov[1]} of {cov[0]} launched (fixed and "
                     f"default) configs compiled, {cand}.")
    if comp["not_compiled"]:
        lines += ["", "**This report is partial**: it was written with `--cached-only` from "
                  "what earlier runs compiled (results are cached per kernel source, so "
                  "`make gpu-compile` continues where they stopped). Every count below covers "
                  "the compiled configs only. Not compiled yet:", ""]
        lines += [f"- {ln}" for ln in comp["not_compiled"]]
    else:
        lines += ["", "Every captured configuration was compiled."]
    lines += ["", "## Summary", "",
              "| target | configs compiled | launched (fixed+default) | compile failures | over "
              "shared limit | spilling launched | spilling candidates | largest spill (B) | max "
              "regs | max shared KB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for t in targets:
        s = comp["summary"][str(t["cap"])]
        lines.append(f"| {t['card']} {t['arch']} | {s['configs']} | {s['launched']} | "
                     f"{s['failures']} | {s['over_smem']} | {s['spilling_launched']} | "
                     f"{s['spilling_candidates']} | {s['largest_spill']}"
                     f"{' (' + s['largest_spill_at'] + ')' if s['largest_spill_at'] else ''} | "
                     f"{s['max_regs']} | {_kb(s['max_shared'])} |")
    probs = comp["violations"]
    lines += ["", f"Rule violations: {len(probs)}."] + [f"- {p}" for p in probs[:60]]
    if len(probs) > 60:
        lines.append(f"- ... and {len(probs) - 60} more (results/gpu_compile_configs.json)")
    if before is not None:
        lines += ["", "## Before and after the fixes", ""] + before_after(before, comp, caps)
    lines += ["", "## csrc/cuda (nvcc, ptxas -v)", ""] + cuda_table(cuda)
    for t in targets:
        lines += ["", f"## Per kernel: {t['card']} ({t['arch']}), {t['smem_per_block']} B "
                  "shared memory per block", ""] + kernel_table(comp["kernels"][str(t["cap"])])
    for t in targets:
        lines += ["", f"## Heaviest configurations: {t['card']} ({t['arch']})", "",
                  "Per kernel the two launched configs with the most registers (distinct "
                  "shape-table cases) and the candidate with the most shared memory: what the "
                  "CI test recompiles. Config: pointer dtype, constexprs (`X==1`: an int "
                  "argument equal to 1, made a constant), `16|...`: int arguments known to be "
                  "multiples of 16, warps and stages.", ""]
        lines += config_table(heaviest(rows, t["cap"]))
    return "\n".join(lines) + "\n"


__all__ = ["ROLES", "spills", "launched", "problems", "cuda_problems", "summary", "kernel_rows",
           "heaviest", "ci_picks", "compact", "markdown", "before_after"]
