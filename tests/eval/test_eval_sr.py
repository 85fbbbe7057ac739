"""`imagen-fast eval sr`: PSNR and SSIM against independent computations, the held-out
truth and its low-res version, and the command end to end on a tiny cascade."""
import json
import math

import numpy as np
import pytest

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from support.eval_helpers import tiny_cascade_dir  # noqa: E402

from imagen_fast.cli import main  # noqa: E402
from imagen_fast.data.shapes import is_held_out  # noqa: E402
from imagen_fast.eval.superres import heldout_truth, psnr, ssim  # noqa: E402


def _rand(rng, n, h, w):
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_psnr_matches_its_definition():
    rng = np.random.default_rng(0)
    x, y = _rand(rng, 3, 17, 23), _rand(rng, 3, 17, 23)
    mse = ((x.astype(np.float64) - y) ** 2).reshape(3, -1).mean(1)
    assert psnr(x, y) == pytest.approx(list(10 * np.log10(255.0 ** 2 / mse)), rel=1e-12)
    assert psnr(x, x) == [math.inf] * 3


def _ssim_scipy(x, y):
    """SSIM through scipy's Gaussian filter (truncate 3.5 = an 11-tap window at sigma 1.5),
    borders cropped where the window does not fit: an independent computation."""
    from scipy.ndimage import gaussian_filter

    out = []
    for a, b in zip(x.astype(np.float64), y.astype(np.float64)):
        vals = []
        for c in range(3):
            f = lambda t: gaussian_filter(t, 1.5, truncate=3.5, mode="constant")[5:-5, 5:-5]  # noqa: E731
            p, q = a[..., c], b[..., c]
            mp, mq = f(p), f(q)
            vp, vq, cpq = f(p * p) - mp ** 2, f(q * q) - mq ** 2, f(p * q) - mp * mq
            c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
            s = ((2 * mp * mq + c1) * (2 * cpq + c2)) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2))
            vals.append(s.mean())
        out.append(float(np.mean(vals)))
    return out


def test_ssim_matches_an_independent_computation():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(1)
    x = _rand(rng, 2, 29, 31)
    noisy = np.clip(x.astype(np.int16) + rng.integers(-40, 41, size=x.shape), 0, 255).astype(np.uint8)
    assert ssim(noisy, x) == pytest.approx(_ssim_scipy(noisy, x), rel=1e-9)
    assert ssim(x, x) == pytest.approx([1.0, 1.0], abs=1e-12)
    # more noise, lower SSIM; symmetric in its arguments
    noisier = np.clip(x.astype(np.int16) + rng.integers(-90, 91, size=x.shape), 0, 255).astype(np.uint8)
    assert all(a > b for a, b in zip(ssim(noisy, x), ssim(noisier, x)))
    assert ssim(noisy, x) == pytest.approx(ssim(x, noisy), rel=1e-12)


def test_metrics_reject_mismatched_or_tiny_images():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(_rand(rng, 1, 16, 16), _rand(rng, 1, 16, 17))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(_rand(rng, 1, 8, 8), _rand(rng, 1, 8, 8))


def test_heldout_truth_is_held_out_and_downsampled_as_training_does():
    from imagen_fast.data.shapes import make_scene
    captions, truth, low = heldout_truth(5, 64, 16, seed=3)
    assert len(captions) == len(truth) == len(low) == 5
    for i, (img, lo) in enumerate(zip(truth, low)):
        assert img.size == (64, 64) and lo.size == (16, 16)
        assert is_held_out(make_scene(3, i, "heldout"))
        assert np.array_equal(np.asarray(lo), np.asarray(img.resize((16, 16), Image.BICUBIC)))


def test_eval_sr_end_to_end(tmp_path, capsys):
    ckpt = tiny_cascade_dir(tmp_path / "cascade", steps=2)
    out = tmp_path / "out"
    rc = main(["eval", "sr", "--checkpoint", ckpt, "--num", "3", "--batch-size", "2",
               "--steps", "1", "--out", str(out), "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num"] == 3 and report["stage"]["name"] == "sr64"
    assert report["stage"]["sampling"]["steps"] == 1
    assert len(report["per_image"]) == 3
    for system in ("stage", "bicubic"):
        for metric in ("psnr", "ssim"):
            assert math.isfinite(report["results"][system][metric]["mean"])
    assert report["psnr_gain_db"] == pytest.approx(
        report["results"]["stage"]["psnr"]["mean"] - report["results"]["bicubic"]["psnr"]["mean"])
    assert (out / "report.md").read_text().startswith("# Super-resolution stage alone vs bicubic")
    sheet = Image.open(out / "samples.png")
    assert sheet.size == (4 * 64, 3 * 64)
    # a base stage is refused, naming it
    assert main(["eval", "sr", "--checkpoint", ckpt, "--stage", "0", "--num", "1",
                 "--out", str(out), "--quiet"]) == 2
    assert "not a super-resolution stage" in capsys.readouterr().err
