"""The feature cache: frozen-ViT tokens of every video in a Zarr store (see `cache.store`)."""

from cache.store import (
    CODECS,
    DEFAULT_CODEC,
    FORMAT_VERSION,
    FeatureStore,
    FingerprintMismatch,
    StoreError,
    diff_fingerprints,
)

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "FORMAT_VERSION",
    "FeatureStore",
    "FingerprintMismatch",
    "StoreError",
    "diff_fingerprints",
]
