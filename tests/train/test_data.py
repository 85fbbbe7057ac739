"""Datasets: shard/folder streams, splitting, bad input, transforms, shapes, resume, CLI."""
import argparse
import io
import json
import random
import tarfile

import pytest
import torch

PIL = pytest.importorskip("PIL", reason="imagen_fast.data needs Pillow")
from PIL import Image  # noqa: E402

from imagen_fast.data import (ImageFolder, ImageTransform, ShapesSource, SkipCounter,  # noqa: E402
                              StreamDataset, StreamPosition, TarShards, expand_shards, make_loader,
                              open_dataset, parse_caption, to_tensor, transform_for_stage,
                              write_shapes)
from imagen_fast.data.cli import add_data_parser  # noqa: E402
from imagen_fast.data.shapes import COLOURS, make_scene, render  # noqa: E402


def _png(color=(200, 30, 30), size=(24, 20), mode="RGB"):
    b = io.BytesIO()
    Image.new(mode, size, color).save(b, format="PNG")
    return b.getvalue()


def _jpg(size=(40, 32)):
    b = io.BytesIO()
    Image.new("RGB", size, (10, 120, 240)).save(b, format="JPEG")
    return b.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _keys(ds, workers, batch=4):
    keys = []
    for b in make_loader(ds, batch, num_workers=workers):
        keys += b["key"]
    return keys


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    write_shapes(d, 40, seed=3, resolution=32, shard_size=5)     # 8 shards
    return d


# -- splitting -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shard_size", [5, 16])    # 8 shards >= 4 workers; 3 shards < 4 workers
def test_two_ranks_two_workers_cover_each_sample_once(tmp_path, shards, shard_size):
    d = shards if shard_size == 5 else tmp_path
    if shard_size != 5:
        write_shapes(d, 40, seed=3, resolution=32, shard_size=shard_size)
    per_rank = []
    for rank in range(2):
        ds = StreamDataset(d, transform_for_stage(32), rank=rank, world_size=2, epochs=1, seed=7)
        per_rank.append(_keys(ds, workers=2))
        assert ds.skips.skipped == 0 and ds.skips.ok == len(per_rank[-1])
    allk = per_rank[0] + per_rank[1]
    assert sorted(allk) == [f"{i:09d}" for i in range(40)]          # each exactly once
    assert per_rank[0] and per_rank[1]


def test_epochs_reshuffle_and_repeat(shards):
    ds = StreamDataset(shards, transform_for_stage(32), epochs=2, seed=1)
    keys = _keys(ds, workers=0)
    first, second = keys[:40], keys[40:]
    assert sorted(first) == sorted(second) == [f"{i:09d}" for i in range(40)]
    assert first != second
    ds2 = StreamDataset(shards, transform_for_stage(32), epochs=1, shuffle=False)
    assert _keys(ds2, workers=0) == [f"{i:09d}" for i in range(40)]


def test_expand_shards(shards):
    assert len(expand_shards(str(shards))) == 8
    assert expand_shards(f"{shards}/{{00001..00003}}.tar") == [f"{shards}/0000{i}.tar" for i in (1, 2, 3)]
    assert len(expand_shards(f"{shards}/*.tar")) == 8
    with pytest.raises(FileNotFoundError, match="shards"):
        expand_shards(f"{shards}/{{00007..00009}}.tar")


# -- bad input -----------------------------------------------------------------------------------

def _bad_shard(path):
    _tar(path, [
        ("a000.png", _png()), ("a000.txt", b"a good red one"),
        ("a001.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("a001.txt", b"corrupt bytes"),
        ("a002.png", _png()[:60]), ("a002.txt", b"truncated png"),
        ("a003.png", _png()),                                            # no caption
        ("a004.txt", b"caption without image"),
        ("a005.png", _png()), ("a005.txt", b"   \n "),                  # empty caption
        ("a006.jpg", _jpg()), ("a006.txt", b"a good jpeg"),
        ("a007.png", _png()), ("a007.txt", b"\xff\xfe bad utf8"),
        ("a008.png", _png(mode="RGBA", color=(0, 0, 0, 0))), ("a008.json", b'{"caption": "from json"}'),
        ("a009.png", _png(mode="L", color=128)), ("a009.txt", b"grey"),
    ])


EXPECTED_SKIPS = {"corrupt_image": 2, "missing_caption": 1, "missing_image": 1, "empty_caption": 1,
                  "bad_caption": 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path, workers, caplog):
    _bad_shard(tmp_path / "bad.tar")
    _tar(tmp_path / "bad2.tar", [("b000.png", _png()), ("b000.txt", b"second shard")])
    ds = StreamDataset(tmp_path, transform_for_stage(16), epochs=1, with_meta=True)
    got = {}
    for b in make_loader(ds, 3, num_workers=workers):
        for k, c, img in zip(b["key"], b["caption"], b["image"]):
            got[k] = (c, img)
        assert b["image"].shape[1:] == (3, 16, 16) and torch.isfinite(b["image"]).all()
    assert sorted(got) == ["a000", "a006", "a008", "a009", "b000"]
    assert got["a008"][0] == "from json"
    assert torch.allclose(got["a008"][1], torch.ones(3, 16, 16))   # transparent -> white
    assert ds.skips.counts() == EXPECTED_SKIPS                         # counted in the workers too
    assert ds.skips.ok == 5 and ds.skips.skipped == 6
    s = ds.skips.summary()
    assert "6 of 11 skipped" in s and "corrupt_image 2" in s
    if workers == 0:
        assert any("a001" in r.getMessage() for r in caplog.records)


def test_truncated_shard_keeps_earlier_samples(tmp_path, shards):
    raw = (shards / "00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[: len(raw) // 2 + 100])
    ds = StreamDataset(tmp_path, transform_for_stage(32), epochs=1)
    keys = _keys(ds, 0)
    assert 0 < len(keys) < 5 and ds.skips.counts() == {"unreadable_shard": 1}


def test_image_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (30, 20), (0, 255, 0)).save(tmp_path / "one.png")
    (tmp_path / "one.txt").write_text("a green card")
    Image.new("RGB", (20, 30), (0, 0, 255)).save(tmp_path / "sub" / "two.jpg")
    (tmp_path / "sub" / "two.txt").write_text("  a blue\ncard ")
    Image.new("RGB", (20, 20)).save(tmp_path / "three.png")              # no caption
    (tmp_path / "four.png").write_bytes(b"garbage")
    (tmp_path / "four.txt").write_text("broken")
    src = ImageFolder(tmp_path)
    assert src.num_units() == 4
    ds = open_dataset(str(tmp_path), transform_for_stage(16), epochs=1, shuffle=False)
    assert isinstance(ds.source, ImageFolder)
    b = next(iter(make_loader(ds, 8)))
    assert b["key"] == ["one", "sub/two"] and b["caption"] == ["a green card", "a blue card"]
    assert ds.skips.counts() == {"missing_caption": 1, "corrupt_image": 1}
    # split across 2 ranks x 2 workers, item granularity
    keys = []
    for rank in range(2):
        keys += _keys(StreamDataset(tmp_path, transform_for_stage(16), rank=rank, world_size=2,
                                    epochs=1), workers=2)
    assert sorted(keys) == ["one", "sub/two"]


def test_skip_counter_state():
    c = SkipCounter()
    c.skip("corrupt_image", "k")
    c.add_ok(3)
    st = c.state_dict()
    c2 = SkipCounter()
    c2.load_state_dict(st)
    assert c2.counts() == {"corrupt_image": 1} and c2.ok == 3
    with pytest.raises(ValueError):
        c.skip("no_such_reason")


# -- transforms ----------------------------------------------------------------------------------

def test_transforms_resize_crop_lowres():
    img = Image.new("RGB", (80, 40))
    img.paste((255, 0, 0), (0, 0, 40, 40))
    x, low = ImageTransform(32)(img)
    assert x.shape == (3, 32, 32) and low is None and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # center crop of the 64x32 resize keeps columns 16..48: left half red, right half black
    assert x[0, :, 2].mean() > 0.9 and x[0, :, -2].mean() < -0.9
    t = ImageTransform(16, resize=32, crop="random", lowres_size=4)
    r1, r2 = random.Random(5), random.Random(5)
    a, la = t(img, r1)
    b, lb = t(img, r2)
    assert torch.equal(a, b) and torch.equal(la, lb) and la.shape == (3, 4, 4)
    crop = t.crop_image(img, random.Random(5))
    assert torch.equal(to_tensor(crop), a)
    assert torch.equal(la, to_tensor(crop.resize((4, 4), Image.BICUBIC)))   # low-res = downsampled crop
    offsets = {t.crop_image(img, random.Random(s)).getbbox() for s in range(20)}
    assert len(offsets) > 1                                                    # crops do move
    for bad in [dict(size=0), dict(size=8, resize=4), dict(size=8, crop="x"),
                dict(size=8, lowres_size=8), dict(size=8, resample="cubic")]:
        with pytest.raises(ValueError, match=list(bad)[-1]):
            ImageTransform(**bad)


def test_sr_stream_gives_lowres(shards):
    ds = StreamDataset(shards, transform_for_stage(16, 4, resize=32), epochs=1)
    b = next(iter(make_loader(ds, 5)))
    assert b["image"].shape == (5, 3, 16, 16) and b["lowres"].shape == (5, 3, 4, 4)


# -- shapes --------------------------------------------------------------------------------------

_REGION_TEST = {"left": lambda b, R: b[2] <= R // 2 + 1, "right": lambda b, R: b[0] >= R // 2 - 1,
                "above": lambda b, R: b[3] <= R // 2 + 1, "below": lambda b, R: b[1] >= R // 2 - 1,
                "center": lambda b, R: b[0] >= R // 4 and b[2] <= 3 * R // 4 + 1}


def test_shapes_captions_agree_with_records(shards):
    ds = StreamDataset(shards, ImageTransform(32), epochs=1, shuffle=False, with_meta=True)
    n = 0
    for b in make_loader(ds, 8):
        for cap, meta, img in zip(b["caption"], b["meta"], b["image"]):
            n += 1
            assert meta["caption"] == cap
            p = parse_caption(cap)
            assert p is not None, cap
            objs = meta["objects"]
            assert [(o["count"], o["colour"], o["shape"]) for o in objs] == \
                [(g["count"], g["colour"], g["shape"]) for g in p["objects"]]
            if len(objs) == 2:
                assert p["relation"] == meta["relation"] == objs[0]["position"]
            else:
                assert p["position"] == objs[0]["position"] and meta["relation"] is None
            for o in objs:
                assert len(o["instances"]) == o["count"] and 1 <= o["count"] <= 4
                assert _REGION_TEST[o["position"]](o["bbox"], 32), (cap, o)
                colour = torch.tensor(COLOURS[o["colour"]], dtype=torch.float32) / 127.5 - 1
                for x0, y0, x1, y1 in o["instances"]:        # the shape's colour at its centre
                    px = img[:, (y0 + 2 * y1) // 3, (x0 + x1) // 2]
                    assert (px - colour).abs().max() < 0.25, (cap, o)
    assert n == 40


def test_shapes_are_deterministic_and_varied(tmp_path):
    write_shapes(tmp_path / "a", 12, seed=9, resolution=16, shard_size=5)
    write_shapes(tmp_path / "b", 12, seed=9, resolution=16, shard_size=5)
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    m = json.loads((tmp_path / "a" / "shapes.json").read_text())
    assert m["num"] == 12 and m["shards"] == ["00000.tar", "00001.tar", "00002.tar"]
    with pytest.raises(FileExistsError):
        write_shapes(tmp_path / "a", 3)
    scenes = [make_scene(0, i) for i in range(200)]
    assert {len(s["objects"]) for s in scenes} == {1, 2}
    assert {o["count"] for s in scenes for o in s["objects"]} == {1, 2, 3, 4}
    assert {o["position"] for s in scenes for o in s["objects"]} == {"left", "right", "above", "below", "center"}
    assert len({s["background"] for s in scenes}) >= 3
    assert all(parse_caption(s["caption"]) for s in scenes)


def test_shapes_on_the_fly_matches_files(shards):
    ds = open_dataset("shapes:40:3", ImageTransform(32), epochs=1, shuffle=False)
    assert isinstance(ds.source, ShapesSource)
    live = next(iter(make_loader(ds, 6)))
    files = next(iter(make_loader(StreamDataset(shards, ImageTransform(32), epochs=1, shuffle=False), 6)))
    assert live["caption"] == files["caption"] and live["key"] == files["key"]
    assert torch.equal(live["image"], files["image"])              # PNG is lossless


def test_held_out_split_is_disjoint_and_reproducible():
    from imagen_fast.data import combination, combination_space, is_held_out
    held, train = combination_space("heldout"), combination_space("train")
    every = combination_space()
    assert len(held) + len(train) == len(every) and 0.03 < len(held) / len(every) < 0.10
    assert {r["caption"] for r in held}.isdisjoint(r["caption"] for r in train)
    # every combination is a caption the grammar parses, without the background clause
    assert all(parse_caption(r["caption"]) and "background" not in r["caption"] for r in held)
    train_scenes = [make_scene(4, i, "train") for i in range(300)]
    held_scenes = [make_scene(4, i, "heldout") for i in range(60)]
    assert not any(is_held_out(s) for s in train_scenes)
    assert all(is_held_out(s) for s in held_scenes)
    assert {combination(s) for s in held_scenes} <= {r["caption"] for r in held}
    assert make_scene(4, 7, "train") == make_scene(4, 7, "train")
    assert make_scene(4, 7) == make_scene(4, 7, "all")                  # "all" is the unsplit stream
    assert {len(s["objects"]) for s in held_scenes} == {1, 2}
    ds = open_dataset("shapes:10:4:heldout", ImageTransform(16), epochs=1, shuffle=False)
    assert all(is_held_out(combination(parse_caption_record(c))) for c in next(iter(make_loader(ds, 10)))["caption"])
    with pytest.raises(ValueError, match="split"):
        make_scene(0, 0, "test")
    with pytest.raises(ValueError, match="spec"):
        open_dataset("shapes:10:4:heldout:extra", ImageTransform(16))


def parse_caption_record(caption):
    """A parsed caption in the scene-record form ``combination`` takes."""
    p = parse_caption(caption)
    objs = [dict(o, position=p.get("position")) for o in p["objects"]]
    return {"relation": p.get("relation"), "objects": objs}


def test_render_record_boxes():
    img, rec = render(make_scene(1, 1), 48)
    assert img.size == (48, 48)
    for o in rec["objects"]:
        assert all(0 <= v <= 48 for b in o["instances"] for v in b)


# -- resume ----------------------------------------------------------------------------------------

def _take(loader, n, pos=None):
    out = []
    for b in loader:
        out.append((b["key"], b["image"]))
        if pos is not None:
            pos.update(b)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers,k", [(0, 3), (2, 3), (2, 4)])
def test_resume_continues_the_same_stream(shards, workers, k):
    def make():
        return StreamDataset(shards, transform_for_stage(16, 4, resize=32), seed=11, shuffle_buffer=8)
    full = _take(make_loader(make(), 3, num_workers=workers), 30)           # endless: crosses epochs
    ds = make()
    pos = StreamPosition(ds)
    head = _take(make_loader(ds, 3, num_workers=workers), k, pos)
    state = json.loads(json.dumps(pos.state_dict()))                         # survives a JSON file
    ds2 = make()
    ds2.set_position(state)
    tail = _take(make_loader(ds2, 3, num_workers=workers), 30 - k)
    got = head + tail
    assert [g[0] for g in got] == [f[0] for f in full]
    assert all(torch.equal(g[1], f[1]) for g, f in zip(got, full))          # random crops replay


# -- CLI -------------------------------------------------------------------------------------------

def test_cli_shapes(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_data_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["data", "shapes", "--out", str(tmp_path / "s"), "--num", "7",
                         "--shard-size", "3", "--resolution", "16", "--quiet"])
    assert args.func(args) == 0
    assert len(TarShards(tmp_path / "s").shards) == 3
    assert args.func(args) == 2                                              # exists: one-line error
    assert "not empty" in capsys.readouterr().err
    args = p.parse_args(["data", "check", "--data", str(tmp_path / "s"), "--size", "16"])
    assert args.func(args) == 0
    assert "7 usable samples" in capsys.readouterr().out
