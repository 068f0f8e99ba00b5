"""What a feature cache must hold for a model: the fingerprint `extract` writes and every reader checks.

`extract` stores `cache_fingerprint(config, vit)` in the store's attributes: the ViT weights'
hash (not the model id: BLIP-2 Flan-T5 and OPT share one ViT), the token shape, frames, image
size, sampling, views, seed, dtypes and decoder. `check_store_fingerprint` recomputes it for a
reader (`train` and `scst` from `make_source`, `eval` per model) and refuses a store that
differs, with the differing keys, exactly as `extract` refuses to mix two fingerprints in one
store. A reader does not load the ViT for this: `vit_weights_sha256` hashes the `vision_model.*`
tensors straight from the safetensors files, in the dtype the store was computed in, which gives
the same hash as `hash_weights` of the loaded ViT (once per process and model folder).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig

from cache.store import diff_fingerprints
from pipeline.errors import FingerprintMismatch
from pipeline.runtime.stage import folder_identity
from pipeline.sampling import VIEW_SCHEME
from pipeline.vision import PREFIX, checkpoint_image_size, tokens_per_frame, vision_files

STORE_DTYPE = "float16"
# Keys a reader of view 0 alone (eval) does not depend on: the augmented views and their seed.
TRAINING_VIEW_KEYS = ("views", "seed")


def hash_state(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of named tensors in name order (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(items, key=lambda item: item[0]):
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def hash_weights(module: Any) -> str:
    """SHA-256 of a module's tensors, independent of the model id."""
    return hash_state(module.state_dict().items())


def vit_weights_sha256(pretrained: str | Path, dtype: str = "float32") -> str:
    """`hash_weights` of the ViT that `FrameEncoder` would load from `pretrained` in `dtype`, from the files."""
    return _vit_hash(str(pretrained), folder_identity(pretrained), dtype)


@functools.lru_cache(maxsize=8)
def _vit_hash(pretrained: str, identity: str, dtype: str) -> str:
    del identity  # part of the cache key only: a rewritten folder is hashed again

    def tensors() -> Iterable[tuple[str, torch.Tensor]]:
        for path in vision_files(pretrained):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    if key.startswith(PREFIX):
                        tensor = f.get_tensor(key).float()  # as `load_vision_model` loads it
                        yield key[len(PREFIX) :], tensor.to(getattr(torch, dtype))

    return hash_state(tensors())


def cache_fingerprint(config: Any, vit: dict[str, Any], model_cfg: Any = None) -> dict[str, Any]:
    """Everything that determines the cached tokens (the store refuses to mix two of these)."""
    model_cfg = model_cfg or config.model
    return {
        "vit_weights_sha256": vit["weights_sha256"],
        "tokens_per_frame": vit["tokens_per_frame"],
        "width": vit["width"],
        "num_frames": model_cfg.num_frames,
        "image_size": vit.get("image_size") or model_cfg.image_size,
        "sampling": VIEW_SCHEME,
        "views": 1 + config.cache.train_views,
        "seed": config.run.seed,
        "compute_dtype": vit["dtype"],
        "store_dtype": STORE_DTYPE,
        "decode_backend": config.decode.backend,
    }


def store_problems(
    store: Any, config: Any, pretrained: str | Path, model_cfg: Any, training: bool
) -> list[str]:
    """Differences between the store's fingerprint and the one `extract` would write for this model.

    The compute dtype may differ (a bf16-extracted cache serves a CPU reader); `training=False`
    (eval: view 0 only) also ignores the augmented views and their seed.
    """
    have = store.fingerprint
    dtype = str(have.get("compute_dtype", "float32"))
    vision = AutoConfig.from_pretrained(str(pretrained)).vision_config  # BLIP-2 or InstructBLIP
    image_size = model_cfg.image_size or checkpoint_image_size(str(pretrained))  # 0: the checkpoint's own
    vit = {
        "image_size": image_size,
        "weights_sha256": vit_weights_sha256(
            pretrained, dtype if dtype in ("float32", "bfloat16") else "float32"
        ),
        "tokens_per_frame": tokens_per_frame(image_size, vision.patch_size),
        "width": vision.hidden_size,
        "dtype": dtype,
    }
    want = cache_fingerprint(config, vit, model_cfg)
    ignored = () if training else TRAINING_VIEW_KEYS
    return diff_fingerprints(
        {k: v for k, v in have.items() if k not in ignored},
        {k: v for k, v in want.items() if k not in ignored},
    )


def check_store_fingerprint(
    store: Any, config: Any, pretrained: str | Path, model_cfg: Any, training: bool = True
) -> None:
    """Raise `FingerprintMismatch` (the differing keys) unless the store holds this model's tokens."""
    differences = store_problems(store, config, pretrained, model_cfg, training)
    if differences:
        raise FingerprintMismatch(store.path, differences)
