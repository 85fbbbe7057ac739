"""DrawBench: the shipped prompts, same seeds for every system, resumable sampling and
the static contact sheets."""
import html
import os
import re

import pytest
from support.eval_helpers import FakeGenerator

from imagen_fast.eval.drawbench import CATEGORY_COUNTS, load_prompts, run_drawbench
from imagen_fast.eval.generator import System
from imagen_fast.eval.manifest import read_manifest


def test_shipped_prompts_are_the_200_of_the_paper():
    prompts = load_prompts()
    assert len(prompts) == 200 and [p.index for p in prompts] == list(range(200))
    counts = {}
    for p in prompts:
        counts[p.category] = counts.get(p.category, 0) + 1
    assert counts == CATEGORY_COUNTS                # "Gary Marcus et al." without its space
    assert all(p.text == p.text.strip() and p.text for p in prompts)
    colors = load_prompts(categories=["colors", "Gary Marcus et al."])
    assert len(colors) == 35 and {p.category for p in colors} == {"Colors", "Gary Marcus et al."}


def test_prompt_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"categories: \['Nope'\]"):
        load_prompts(categories=["Nope"])
    empty = tmp_path / "empty.csv"
    empty.write_text("Prompt,Category\n")
    with pytest.raises(ValueError, match="no prompts in"):
        load_prompts(str(empty))
    bad = tmp_path / "bad.csv"
    bad.write_text("text,kind\nhello,x\n")
    with pytest.raises(ValueError, match="columns Prompt and Category"):
        load_prompts(str(bad))
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_prompts(str(tmp_path / "none.csv"))


def _prompts(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('Prompt,Category\nA red cube.,Colors\n"Two <b>cats</b> & a dog.",Counting \n'
                 "A blue ball.,Colors\n")
    return load_prompts(str(f))


def test_side_by_side_sheets_with_shared_seeds(tmp_path):
    prompts = _prompts(tmp_path)
    ga, gb = FakeGenerator(size=24), FakeGenerator(size=24)
    systems = [System("ckpt A", ga, {"guidance": 1.0}), System("ckpt B", gb, {"guidance": 3.0})]
    out = tmp_path / "out"
    index = run_drawbench(systems, str(out), num_images=2, prompts=prompts, seed=7, batch_size=4)
    # both systems sampled the same prompts with the same seeds, in the same batches
    assert [(c[0], c[1]) for c in ga.calls] == [(c[0], c[1]) for c in gb.calls]
    assert [c[1] for c in ga.calls] == [7, 8] and ga.calls[0][2] == {"guidance": 1.0}
    assert sum(len(c[0]) for c in ga.calls) == 6
    m = read_manifest(str(out))
    assert m.labels == ["ckpt A", "ckpt B"] and len(m.items) == 3
    assert m.items[1]["category"] == "Counting"
    for it in m.items:
        for label in m.labels:
            assert len(it["images"][label]) == 2
            assert all(os.path.isfile(m.image_path(p)) for p in it["images"][label])
    with open(index, encoding="utf-8") as f:
        page = f.read()
    assert "category-colors.html" in page and "category-counting.html" in page
    colors = (out / "category-colors.html").read_text()
    assert colors.count("<tr><td class=\"prompt\">") == 2
    assert "<th>ckpt A</th><th>ckpt B</th>" in colors
    for src in re.findall(r'<img src="([^"]+)"', colors):
        assert os.path.isfile(out / html.unescape(src))
    counting = (out / "category-counting.html").read_text()
    assert "Two &lt;b&gt;cats&lt;/b&gt; &amp; a dog." in counting and "<b>cats" not in counting
    # a rerun reuses every image; another system into the same folder is refused
    run_drawbench(systems, str(out), num_images=2, prompts=prompts, seed=7, batch_size=4)
    assert len(ga.calls) == 2
    with pytest.raises(FileExistsError, match="another run"):
        run_drawbench([System("ckpt A", ga, {"guidance": 2.0})], str(out), num_images=2,
                      prompts=prompts, seed=7, batch_size=4)
    run_drawbench([System("ckpt A", ga, {"guidance": 2.0})], str(out), num_images=2,
                  prompts=prompts, seed=7, batch_size=4, overwrite=True)
    assert len(ga.calls) == 4


def test_drawbench_bad_input(tmp_path):
    gen = FakeGenerator()
    with pytest.raises(ValueError, match="labels must differ"):
        run_drawbench([System("a", gen), System("a", gen)], str(tmp_path))
    with pytest.raises(ValueError, match="at least one system"):
        run_drawbench([], str(tmp_path))
    with pytest.raises(ValueError, match="num_images"):
        run_drawbench([System("a", gen)], str(tmp_path), num_images=0)
    with pytest.raises(ValueError, match="returned 0 images for 1 prompts"):
        run_drawbench([System("a", lambda p, seed=0: [])], str(tmp_path / "x"), num_images=1,
                      prompts=_prompts(tmp_path)[:1])
