"""The rating study: questions, batches of 50, controls, the SQLite store with per-rater
tokens, the HTTP API, and the report's screening and intervals."""
import json
import os
import threading
import urllib.error
import urllib.request
from collections import Counter
from contextlib import closing

import numpy as np
import pytest
from support.eval_helpers import make_samples, random_image
from scipy.stats import binomtest

from imagen_fast.eval.manifest import REFERENCE, read_manifest
from imagen_fast.eval.serve import StudyConfig, build_report, format_report, open_study
from imagen_fast.eval.serve.report import bootstrap_mean_interval, wilson_interval
from imagen_fast.eval.serve.store import StoreError
from imagen_fast.eval.serve.study import build_study, degrade


def test_study_batches_of_50_with_interleaved_controls(tmp_path):
    m = read_manifest(make_samples(tmp_path / "s", 70))
    study = build_study(m, StudyConfig(), str(tmp_path / "controls"))
    real = [q for q in study.questions if not q.control]
    controls = [q for q in study.questions if q.control]
    # 70 items: photorealism + caption_ab pairs, alignment of both systems = 280 questions
    assert Counter(q.kind for q in real) == {"photorealism": 70, "caption_ab": 70, "alignment": 140}
    sizes = Counter(q.batch for q in real)
    assert sorted(sizes.values()) == [30, 50, 50, 50, 50, 50] and study.num_batches == 6
    per_batch = Counter(q.batch for q in controls)
    assert all(per_batch[b] == -(-sizes[b] // 5) for b in sizes)   # one per 5 questions
    for q in controls:
        if q.kind == "alignment":
            assert q.expected == "no"
            own = next(it for it in m.items if it["id"] == q.item)
            assert q.caption != own["caption"]               # someone else's caption
        elif q.kind == "photorealism":
            degraded = q.image_b if q.expected == "a" else q.image_a
            assert os.path.isfile(degraded) and "controls" in degraded
        else:
            assert q.expected in ("a", "b")
            right = q.image_a if q.expected == "a" else q.image_b
            assert os.path.basename(right) == f"{REFERENCE}-{q.item}.png"
    assert study.digest() == build_study(m, StudyConfig(), str(tmp_path / "controls")).digest()
    assert study.digest() != build_study(m, StudyConfig(seed=1), str(tmp_path / "c2")).digest()


def test_degraded_control_image_is_not_the_original():
    rng = np.random.default_rng(0)
    img = random_image(rng, 64, 48)
    d = degrade(img, seed=3)
    a, b = np.asarray(img, np.float64)[:48, :64], np.asarray(d, np.float64)
    assert d.size == (64, 48) and np.abs(a - b).mean() > 25


def test_study_config_errors(tmp_path):
    with pytest.raises(ValueError, match="tasks"):
        StudyConfig(tasks=["beauty"])
    with pytest.raises(ValueError, match="compare"):
        StudyConfig(compare=["a", "a"])
    with pytest.raises(ValueError, match="batch_size"):
        StudyConfig(batch_size=0)
    m = read_manifest(make_samples(tmp_path / "s", 3))
    with pytest.raises(ValueError, match="'nope' is not in"):
        build_study(m, StudyConfig(compare=["model", "nope"]), str(tmp_path / "c"))
    one = read_manifest(make_samples(tmp_path / "one", 3, systems=("model",)))
    with pytest.raises(ValueError, match="compare two systems"):
        build_study(one, StudyConfig(), str(tmp_path / "c"))
    # alignment alone works with one system
    assert build_study(one, StudyConfig(tasks=["alignment"]), str(tmp_path / "c")).questions


@pytest.fixture
def store(tmp_path):
    samples = make_samples(tmp_path / "s", 12)
    return open_study(str(tmp_path / "r.sqlite"), samples,
                      StudyConfig(batch_size=10, control_every=5))


def answer_all(store, rater, right_controls=True,
               choose=lambda q: "yes" if q["kind"] == "alignment" else "left"):
    """Answer every trial; controls right or wrong on purpose."""
    while True:
        t = store.next_trial(rater)
        if t is None:
            return
        with closing(store._connect()) as db:
            q = db.execute("SELECT q.kind, q.control, q.expected, t.swapped FROM trials t JOIN "
                           "questions q ON q.id = t.question WHERE t.id = ?", (t["id"],)).fetchone()
        if q["control"]:
            if q["kind"] == "alignment":
                ans = "no" if right_controls else "yes"
            else:
                left_is_a = not q["swapped"]
                want_left = (q["expected"] == "a") == left_is_a
                ans = "left" if want_left == right_controls else "right"
        else:
            ans = choose(q)
        store.answer(rater, t["id"], ans)


def test_store_raters_batches_and_ownership(store, tmp_path):
    a = store.create_rater("alice")
    b = store.create_rater("bob")
    assert a["token"] != b["token"] and {a["batch"], b["batch"]} == {0, 1}
    ra, rb = store.rater_of(a["token"]), store.rater_of(b["token"])
    # the token itself is not stored
    with closing(store._connect()) as db:
        assert a["token"] not in json.dumps([tuple(r) for r in db.execute("SELECT * FROM raters")])
    t = store.next_trial(ra)
    assert t["position"] == 0 and t["total"] == a["total"] == 12   # 10 questions + 2 controls
    with pytest.raises(StoreError) as e:
        store.answer(rb, t["id"], "yes" if t["kind"] == "alignment" else "left")
    assert e.value.status == 403
    ok = "yes" if t["kind"] == "alignment" else "left"
    bad = "maybe" if t["kind"] == "alignment" else "up"
    with pytest.raises(StoreError) as e:
        store.answer(ra, t["id"], bad)
    assert e.value.status == 400
    store.answer(ra, t["id"], ok)
    store.answer(ra, t["id"], ok)                      # a retry of the same answer
    other = "no" if t["kind"] == "alignment" else "right"
    with pytest.raises(StoreError) as e:
        store.answer(ra, t["id"], other)
    assert e.value.status == 409
    assert store.next_trial(ra)["position"] == 1
    for tok in (None, "", "forged"):
        with pytest.raises(StoreError) as e:
            store.rater_of(tok)
        assert e.value.status == 401
    # controls interleaved: one in each block of five questions
    with closing(store._connect()) as db:
        flags = [r[0] for r in db.execute(
            "SELECT q.control FROM trials t JOIN questions q ON q.id = t.question "
            "WHERE t.rater = ? ORDER BY t.position", (ra,))]
    assert sum(flags) == 2 and sum(flags[:6]) == 1 and sum(flags[6:]) == 1
    # raters fill the 5 batches (48 questions / 10) evenly, lowest batch first
    assert [store.create_rater(f"r{i}")["batch"] for i in range(4)] == [2, 3, 4, 0]


def test_store_survives_reopening_and_refuses_another_study(store, tmp_path):
    r = store.create_rater("x")
    rid = store.rater_of(r["token"])
    t = store.next_trial(rid)
    store.answer(rid, t["id"], "no" if t["kind"] == "alignment" else "indifferent")
    again = open_study(store.path)          # reopened without the samples folder
    assert again.next_trial(again.rater_of(r["token"]))["position"] == 1
    same = open_study(store.path, str(tmp_path / "s"), StudyConfig(batch_size=10, control_every=5))
    assert same.progress(rid)["done"] == 1
    with pytest.raises(ValueError, match="already holds another study"):
        open_study(store.path, str(tmp_path / "s"), StudyConfig(batch_size=20))
    with pytest.raises(FileNotFoundError, match="rating database not found"):
        open_study(str(tmp_path / "missing.sqlite"))


def test_report_screens_raters_and_gives_intervals(store):
    good = [store.create_rater(f"good{i}") for i in range(2)]
    sloppy = store.create_rater("sloppy")
    for r in good:
        answer_all(store, store.rater_of(r["token"]), right_controls=True)
    answer_all(store, store.rater_of(sloppy["token"]), right_controls=False,
               choose=lambda q: "no" if q["kind"] == "alignment" else "right")
    rep = build_report(store)
    assert rep["raters"]["total"] == 3 and rep["raters"]["kept"] == 2
    kept = {d["name"]: d["kept"] for d in rep["raters"]["details"]}
    assert kept == {"good0": True, "good1": True, "sloppy": False}
    # only the kept raters' real answers: each real question of batch 0 and 1 once
    n_real = sum(x["n"] for x in rep["ab"]) + sum(x["n"] for x in rep["alignment"])
    assert n_real == 20
    for x in rep["ab"]:
        assert x["a"]["count"] + x["b"]["count"] + x["indifferent"]["count"] == x["n"]
        lo, hi = binomtest(x["a"]["count"], x["n"]).proportion_ci(method="wilson")
        assert x["a"]["ci95"] == pytest.approx([lo, hi], abs=1e-9)
    for x in rep["alignment"]:
        assert x["score"] == pytest.approx(100 * x["yes"]["rate"] + 50 * x["somewhat"]["rate"])
    text = format_report(rep)
    assert "2 kept" in text and "Wilson" in text and "sloppy" in text


def test_wilson_and_bootstrap_intervals():
    for k, n in [(0, 10), (5, 10), (9, 10), (37, 200), (200, 200)]:
        lo, hi = binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_interval(k, n) == pytest.approx((lo, hi), abs=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    lo, hi = bootstrap_mean_interval([100] * 30 + [0] * 10)
    assert lo < 75 < hi and hi - lo < 35
    assert bootstrap_mean_interval([50.0] * 5) == (50.0, 50.0)


class _Server:
    def __init__(self, store):
        from wsgiref.simple_server import make_server

        from imagen_fast.eval.serve.app import (
            RatingApp,
            ThreadingWSGIServer,
            _QuietHandler,
        )
        self.httpd = make_server("127.0.0.1", 0, RatingApp(store),
                                 server_class=ThreadingWSGIServer, handler_class=_QuietHandler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method, path, body=None, token=None):
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if resp.headers["Content-Type"] ==
                                     "application/json" else raw)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_api(store):
    srv = _Server(store)
    try:
        status, page = srv.request("GET", "/")
        assert status == 200 and b"/static/app.js" in page
        assert srv.request("GET", "/static/app.js")[0] == 200
        assert srv.request("GET", "/static/../store.py")[0] == 404
        assert srv.request("GET", "/api/next")[0] == 401
        status, a = srv.request("POST", "/api/raters", {"name": "a"})
        assert status == 201
        _, b = srv.request("POST", "/api/raters", {"name": "b"})
        status, nxt = srv.request("GET", "/api/next", token=a["token"])
        t = nxt["trial"]
        assert status == 200 and not nxt["done"] and t["question"] and t["images"]
        status, img = srv.request("GET", t["images"][0])
        assert status == 200 and img[:8] == b"\x89PNG\r\n\x1a\n"
        assert srv.request("GET", "/img/99999")[0] == 404
        ans = t["choices"][0]["value"]
        # rater b cannot answer rater a's trial; nothing is written
        status, err = srv.request("POST", "/api/answer", {"trial": t["id"], "answer": ans},
                                  token=b["token"])
        assert status == 403 and "another rater" in err["error"]
        assert srv.request("GET", "/api/next", token=a["token"])[1]["trial"]["id"] == t["id"]
        assert srv.request("POST", "/api/answer", {"trial": t["id"], "answer": ans})[0] == 401
        assert srv.request("POST", "/api/answer", {"trial": "x", "answer": ans},
                           token=a["token"])[0] == 400
        status, ok = srv.request("POST", "/api/answer", {"trial": t["id"], "answer": ans},
                                 token=a["token"])
        assert status == 200 and ok["progress"]["done"] == 1
        assert srv.request("GET", "/api/answer")[0] == 405
    finally:
        srv.close()


def test_raters_starting_at_once_get_distinct_batches(store):
    results, errors = [], []

    def start(i):
        try:
            results.append(store.create_rater(f"r{i}")["batch"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=start, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [0, 1, 2, 3, 4]
