"""Text data for calibration and evaluation: the built-in corpus and token batches.

``import allocator.data`` does not import torch; building batches does.
"""

from allocator.data.batches import CalibrationData, batches_fingerprint, load_texts, read_text_file
from allocator.data.corpus import (
    CORPUS_MODULES,
    SPLITS,
    corpus_documents,
    corpus_fingerprint,
    corpus_texts,
    split_of,
    texts_fingerprint,
)

__all__ = [
    "CORPUS_MODULES",
    "SPLITS",
    "CalibrationData",
    "batches_fingerprint",
    "corpus_documents",
    "corpus_fingerprint",
    "corpus_texts",
    "load_texts",
    "read_text_file",
    "split_of",
    "texts_fingerprint",
]
