"""Data for calibration and evaluation: the built-in corpus (five domains and their mix,
``allocator.model.data.domains``) and token batches, and the digits
images of the bundled ViT classifier (``DigitsData``; ``data_for`` picks the right one), and the
user's own files (``user_data_for``: ``--data`` / ``--eval-data``, see ``allocator.model.data.user``).

``import allocator.model.data`` does not import torch; building batches does.
"""

from allocator.model.data.batches import (
    CalibrationData,
    batch_rows,
    batches_fingerprint,
    load_texts,
    read_text_file,
)
from allocator.model.data.corpus import (
    CORPUS_MODULES,
    SPLITS,
    corpus_documents,
    corpus_fingerprint,
    corpus_texts,
    split_of,
    texts_fingerprint,
)
from allocator.model.data.domains import (
    DOMAINS,
    builtin_fingerprint,
    builtin_texts,
    corpus_provenance,
    mixed_texts,
    parse_builtin,
)
from allocator.model.data.images import DigitsData, data_for
from allocator.model.data.user import data_description, user_data_for

__all__ = [
    "batch_rows",
    "CORPUS_MODULES",
    "DOMAINS",
    "SPLITS",
    "CalibrationData",
    "DigitsData",
    "batches_fingerprint",
    "builtin_fingerprint",
    "builtin_texts",
    "corpus_documents",
    "corpus_fingerprint",
    "corpus_provenance",
    "corpus_texts",
    "data_description",
    "data_for",
    "load_texts",
    "mixed_texts",
    "parse_builtin",
    "read_text_file",
    "split_of",
    "texts_fingerprint",
    "user_data_for",
]
