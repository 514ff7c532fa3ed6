"""Pretraining data: corpus readers, NSP instances, masking, packing, the prepare CLI and the batch loader.

Names are imported lazily so that `prepare`'s worker processes import only what they use.
"""

from __future__ import annotations

_EXPORTS = {
    "DataError": "flaxbert.data.corpus",
    "read_documents": "flaxbert.data.corpus",
    "split_sentences": "flaxbert.data.corpus",
    "prepare": "flaxbert.data.shards",
    "load_manifest": "flaxbert.data.shards",
    "check_model": "flaxbert.data.shards",
    "make_loader": "flaxbert.data.loader",
    "Loader": "flaxbert.data.loader",
    "BATCH_KEYS": "flaxbert.data.loader",
    "PACKED_KEYS": "flaxbert.data.loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flaxbert.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
