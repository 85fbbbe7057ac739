"""FID: the Frechet distance against scipy, streaming statistics, clean resizing, the
Inception 2015-12-05 layout, the cached reference statistics and FID-30K end to end."""
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from support.eval_helpers import (
    FakeGenerator,
    random_inception,
    random_inception_file,
    small_extractor,
    tiny_cascade_dir,
    write_coco,
)
from PIL import Image

from imagen_fast.eval import fid as F
from imagen_fast.eval.coco import load_coco
from imagen_fast.eval.generator import System, load_generator
from imagen_fast.eval.images import load_rgb, square_resize
from imagen_fast.eval.inception import FEATURE_DIM, InceptionV3, load_inception


def scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def random_features(rng, n, d, scale=1.0, offset=0.0):
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix * scale + offset


@pytest.mark.parametrize("n,d", [(400, 7), (300, 33), (1000, 64)])
def test_frechet_distance_matches_scipy(n, d):
    rng = np.random.default_rng(d)
    a = random_features(rng, n, d)
    b = random_features(rng, n, d, scale=1.3, offset=rng.normal(size=d) * 0.5)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours, ref = F.frechet_distance(mu1, s1, mu2, s2), scipy_fid(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9)
    # a distance: symmetric, zero on itself, and a pure mean shift adds ||delta||^2
    assert F.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9)
    assert abs(F.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)
    delta = rng.normal(size=d)
    assert F.frechet_distance(mu1 + delta, s1, mu1, s1) == pytest.approx(delta @ delta, rel=1e-7)


def test_frechet_distance_singular_covariances():
    # fewer samples than features, as in small FID runs: both covariances are singular
    rng = np.random.default_rng(1)
    a, b = random_features(rng, 20, 48), random_features(rng, 25, 48, scale=0.7, offset=0.2)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours = F.frechet_distance(mu1, s1, mu2, s2)
    # scipy's Schur-based sqrtm of the non-symmetric product copes here (tiny imaginary
    # parts, dropped as the reference tools do); no epsilon on the diagonal, which would
    # shift the result by O(sqrt(eps)) per null direction
    assert ours == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-7)
    assert np.isfinite(ours) and ours > 0
    # one singular, one positive definite: the Cholesky and the eigen route agree (to the
    # noise floor: rounding-level eigenvalues of a singular product enter through a sqrt)
    c = random_features(rng, 500, 48, scale=1.1)
    mu3, s3 = c.mean(0), np.cov(c, rowvar=False)
    d13 = F.frechet_distance(mu1, s1, mu3, s3)
    assert d13 == pytest.approx(F.frechet_distance(mu3, s3, mu1, s1), rel=1e-7)
    assert d13 == pytest.approx(scipy_fid(mu3, s3, mu1, s1), rel=1e-7)
    # with the small sets' feature factors (S = F^T F): a 20 x 20 problem, same answer
    fa = (a - mu1) / np.sqrt(len(a) - 1)
    fb = (b - mu2) / np.sqrt(len(b) - 1)
    assert F.frechet_distance(mu1, s1, mu2, s2, fa, None) == pytest.approx(ours, rel=1e-7)
    assert F.frechet_distance(mu1, s1, mu2, s2, None, fb) == pytest.approx(ours, rel=1e-7)
    assert F.frechet_distance(mu1, s1, mu3, s3, fa, None) == pytest.approx(d13, rel=1e-7)
    rs = F.RunningStatistics()
    rs.update(a[:7])
    rs.update(a[7:])
    st = rs.result()
    np.testing.assert_allclose(st.factor.T @ st.factor, s1, rtol=1e-9, atol=1e-12)
    assert F.fid_from_statistics(st, F.Statistics(mu2, s2, len(b))) == pytest.approx(ours, rel=1e-7)


def test_frechet_distance_bad_input():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="mu1, mu2"):
        F.frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        F.frechet_distance(mu, s, mu, np.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        F.frechet_distance(mu, s, mu, np.full((3, 3), np.nan))


def test_running_statistics_match_numpy_with_a_large_mean():
    rng = np.random.default_rng(0)
    feats = random_features(rng, 777, 20, offset=1e4)   # large offset: cancellation trap
    rs = F.RunningStatistics()
    for lo, hi in [(0, 5), (5, 300), (300, 301), (301, 777)]:
        rs.update(feats[lo:hi])
    st = rs.result()
    assert st.n == 777 and st.factor is None      # more images than features: no factor
    np.testing.assert_allclose(st.mu, feats.mean(0), rtol=1e-12)
    ref = np.cov(feats, rowvar=False)
    np.testing.assert_allclose(st.sigma, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())
    with pytest.raises(ValueError, match="at least 2"):
        F.RunningStatistics().result()
    with pytest.raises(ValueError, match="width"):
        rs.update(np.zeros((2, 3)))


def test_statistics_save_load(tmp_path):
    rng = np.random.default_rng(0)
    st = F.Statistics(rng.normal(size=5), np.cov(rng.normal(size=(10, 5)), rowvar=False), 10)
    st.save(str(tmp_path / "s.npz"))
    back = F.Statistics.load(str(tmp_path / "s.npz"))
    assert back.n == 10 and np.array_equal(back.mu, st.mu) and np.array_equal(back.sigma, st.sigma)


def test_clean_resize_is_per_channel_float_bicubic():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    out = F.clean_resize(img, 299)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    # float resizing keeps sub-integer values (uint8 resizers quantise them away)
    assert np.mean(out != np.round(out)) > 0.5
    # the channels are resized independently: permuting channels commutes
    np.testing.assert_array_equal(F.clean_resize(img[:, :, ::-1], 299), out[:, :, ::-1])
    # a constant image stays constant; a smooth ramp is reproduced closely
    flat = np.full((20, 30, 3), 77, np.uint8)
    np.testing.assert_allclose(F.clean_resize(flat, 64), 77, atol=1e-3)
    ramp = np.repeat(np.linspace(0, 255, 128).round().astype(np.uint8)[None, :, None], 128, 0)
    ramp = np.repeat(ramp, 3, 2)
    up = F.clean_resize(ramp, 256)[128, 8:-8, 0]
    expected = np.interp(np.arange(8, 248) / 2 - 0.25, np.arange(128), ramp[0, :, 0].astype(float))
    np.testing.assert_allclose(up, expected, atol=1.5)
    # at the target size it is the identity; PIL images are accepted too
    np.testing.assert_array_equal(F.clean_resize(img[:30, :30], 30), img[:30, :30].astype(np.float32))
    np.testing.assert_array_equal(F.clean_resize(Image.fromarray(img), 299), out)


def test_inception_layout_and_loading(tmp_path):
    model = random_inception(0)
    sd = model.state_dict()
    # the 2015-12-05 FID network's layout: names, the 1008-way classifier, TF's BN eps
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert model.Mixed_5b.branch_pool.bn.eps == 1e-3
    path = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, path)
    loaded = load_inception(str(path))
    assert len(loaded.weights_sha256) == 64
    with torch.no_grad():
        f = loaded(torch.rand(1, 3, 299, 299) * 255)
        assert f.shape == (1, FEATURE_DIM) and torch.isfinite(f).all() and f.abs().sum() > 0
        x = torch.rand(2, 3, 80, 96) * 255        # convolutional: smaller inputs run too
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.fc.weight is not None and torch.equal(loaded.fc.weight, sd["fc.weight"])
    # the same tensors as safetensors
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    assert load_inception(str(tmp_path / "w.safetensors")).weights_sha256 != loaded.weights_sha256


def test_inception_bad_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_inception(str(tmp_path / "nope.pth"))
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit this architecture.*missing.*Inception 2015-12-05 layout"):
        load_inception(str(tmp_path / "other.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a plain state dict"):
        load_inception(str(tmp_path / "junk.pth"))
    sd = InceptionV3().state_dict()
    sd["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="other shapes"):
        load_inception(str(tmp_path / "shape.pth"))


def test_reference_statistics_are_cached_by_weights_and_files(tmp_path):
    coco = load_coco(write_coco(tmp_path / "coco", num_images=6))
    ex = small_extractor(0)
    cache = str(tmp_path / "cache")
    st, path, cached = F.cached_statistics(coco.image_paths(), ex, size=64, root=coco.image_dir,
                                           cache_dir=cache)
    assert not cached and os.path.isfile(path) and st.n == 6
    # what it caches: features of the centre-cropped, resized images
    direct = ex([square_resize(load_rgb(p), 64) for p in coco.image_paths()])
    np.testing.assert_allclose(st.mu, direct.mean(0), rtol=1e-10)
    np.testing.assert_allclose(st.sigma, np.cov(direct, rowvar=False), rtol=1e-8, atol=1e-12)
    again, path2, cached = F.cached_statistics(coco.image_paths(), ex, size=64,
                                               root=coco.image_dir, cache_dir=cache)
    assert cached and path2 == path and np.array_equal(again.sigma, st.sigma)
    # other weights, another size, a changed file: a new entry
    assert F.cached_statistics(coco.image_paths(), small_extractor(1), size=64,
                               root=coco.image_dir, cache_dir=cache)[1] != path
    assert F.cached_statistics(coco.image_paths(), ex, size=32, root=coco.image_dir,
                               cache_dir=cache)[1] != path
    victim = coco.image_paths()[0]
    Image.new("RGB", (50, 40), (3, 4, 5)).save(victim)
    assert F.cached_statistics(coco.image_paths(), ex, size=64, root=coco.image_dir,
                               cache_dir=cache)[1] != path


def test_coco_loading_and_caption_sampling(tmp_path):
    root = write_coco(tmp_path / "coco", num_images=5, captions_per_image=3)
    coco = load_coco(root)
    assert len(coco.annotations) == 15 and len(coco.images) == 5
    s = coco.sample(10, seed=3)
    assert len(set(s)) == 10 and s == coco.sample(10, seed=3) and s != coco.sample(10, seed=4)
    with pytest.raises(ValueError, match="16 captions asked for"):
        coco.sample(16)
    # a COCO directory without captions, a missing image, a missing directory
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no captions file"):
        load_coco(str(empty))
    os.remove(coco.image_paths()[0])
    with pytest.raises(FileNotFoundError, match="1 image.*missing"):
        load_coco(root)
    with pytest.raises(FileNotFoundError, match="COCO directory not found"):
        load_coco(str(tmp_path / "nowhere"))


def test_fid_coco_end_to_end_with_random_inception(tmp_path, monkeypatch):
    """FID-30K's protocol at toy scale: the tiny random cascade, the real Inception
    architecture with random weights from a file, the samples kept and checked by hand."""
    coco = load_coco(write_coco(tmp_path / "coco", num_images=5, captions_per_image=2))
    # 80 px instead of 299 keeps this affordable on a CPU; the plumbing is the same
    ex = F.FeatureExtractor.inception(random_inception_file(tmp_path / "inc.pth"), batch_size=8,
                                      input_size=80)
    system = System("tiny", load_generator(tiny_cascade_dir(tmp_path / "ckpt")))
    # the 2048-d distance itself is checked against scipy above; here, what goes into it
    seen = []
    real = F.fid_from_statistics
    monkeypatch.setattr(F, "fid_from_statistics",
                        lambda a, b: seen.extend([(a, b), real(a, b)]) or seen[-1])
    r = F.fid_coco(system, coco, ex, num=4, size=48, seed=1, batch_size=4,
                   cache_dir=str(tmp_path / "cache"), samples_dir=str(tmp_path / "samples"))
    assert r["num"] == 4 and r["reference"]["num_images"] == 5 and not r["reference"]["was_cached"]
    assert os.path.isfile(r["reference"]["cache"])
    # recompute from the kept samples and the reference images directly
    samples = [load_rgb(str(tmp_path / "samples" / f"{i:05d}.png")) for i in range(4)]
    assert all(im.size == (48, 48) for im in samples)       # 64 px samples resized to 48
    fa = ex(samples)      # (the reference side is checked in the cache test)
    (got_a, got_b), fid = seen
    np.testing.assert_allclose(got_a.mu, fa.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got_a.sigma, np.cov(fa, rowvar=False), rtol=1e-7,
                               atol=1e-9 * np.abs(got_a.sigma).max())
    assert got_b.n == 5 and got_b.mu.shape == (2048,)
    assert r["fid"] == fid and fid > 0
    # the manifest pairs each sample with its caption and COCO image (for the rating app)
    from imagen_fast.eval.manifest import read_manifest
    m = read_manifest(str(tmp_path / "samples"))
    assert m.labels == ["tiny", "reference"] and len(m.items) == 4
    for it in m.items:
        ref = m.image_path(it["images"]["reference"][0])
        assert os.path.isfile(ref) and it["caption"] in [c for i, c in coco.annotations
                                                          if coco.images[i] == ref]


def test_fid_coco_resumes_without_resampling(tmp_path):
    coco = load_coco(write_coco(tmp_path / "coco", num_images=6))
    gen = FakeGenerator(size=40)
    system = System("fake", gen)
    kw = dict(num=7, size=32, seed=0, batch_size=3, cache_dir="", samples_dir=str(tmp_path / "s"))
    r = F.fid_coco(system, coco, small_extractor(), **kw)
    assert len(gen.calls) == 3 and [c[1] for c in gen.calls] == [0, 1, 2]
    os.remove(tmp_path / "s" / "00004.png")        # as if killed while writing batch 1
    r2 = F.fid_coco(system, coco, small_extractor(), **kw)
    assert len(gen.calls) == 4 and gen.calls[-1][1] == 1   # only that batch again, same seed
    assert r2["fid"] == pytest.approx(r["fid"], rel=1e-12)
    with pytest.raises(FileExistsError, match="another run"):
        F.fid_coco(system, coco, small_extractor(), **{**kw, "seed": 5})


def test_fid_of_folders(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png")
    ex = small_extractor()
    r = F.fid_of_folders(str(tmp_path / "a"), str(tmp_path / "b"), ex, cache_dir="")
    assert r["num_a"] == r["num_b"] == 5 and r["fid"] > 0
    assert F.fid_of_folders(str(tmp_path / "a"), str(tmp_path / "a"), ex,
                            cache_dir="")["fid"] == pytest.approx(0, abs=1e-6)
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="holds 0 image"):
        F.fid_of_folders(str(tmp_path / "a"), str(tmp_path / "c"), ex, cache_dir="")
