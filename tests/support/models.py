"""Inputs for the U-Net tests (torch and Flax twins alike)."""
import torch


def make_inputs(model, batch=2, length=6, size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    res = size or c["image_size"]
    x = torch.randn(batch, 3, res, res, generator=g)
    t = torch.rand(batch, generator=g)
    text = torch.randn(batch, length, c["text_dim"], generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, length // 2:] = False                       # a padded prompt
    kw = {}
    if c["stage"] == "sr":
        low = res * c["lowres_size"] // c["image_size"]
        kw = dict(lowres=torch.randn(batch, 3, low, low, generator=g), aug_level=torch.rand(batch, generator=g))
    return x, t, text, mask, kw


def randomize_output(model, seed=0):
    """Fresh U-Nets zero-init the last layer of every residual branch and the output
    conv (so the output is 0 and most gradients vanish): give those weights values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    return model
