"""The frozen ViT on its own: what `extract` runs, loaded without the Q-Former and the LLM.

A BLIP-2 checkpoint stores the ViT under `vision_model.*` beside a language model that is 3-7x
larger (Flan-T5-XL, OPT-2.7B/6.7B). Extraction needs only the ViT, so `load_vision_model`
reads just those tensors from the safetensors files (and, from the hub, downloads just the
shards that hold them): every Dask worker then holds about 1B parameters instead of 4-8B.
`run_vit` is the one place frames go through a ViT, for `FrameEncoder` and `VideoCaptioner`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError
from safetensors import safe_open
from torch import Tensor, nn
from transformers import Blip2Config, Blip2VisionModel

from pipeline.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PREFIX = "vision_model."


def compute_dtype(model_cfg: ModelConfig, device: torch.device) -> torch.dtype | None:
    """None: plain fp32. bf16 autocast on CUDA by default; never fp16 (T5 overflows)."""
    if model_cfg.dtype == "bfloat16" or (model_cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def tokens_per_frame(image_size: int, patch_size: int) -> int:
    """ViT tokens per frame: the patches plus CLS (257 for EVA ViT-g at 224 px, patch 14)."""
    return (image_size // patch_size) ** 2 + 1


@torch.no_grad()
def run_vit(vit: nn.Module, pixel_values: Tensor, trained_size: int, dtype: torch.dtype | None) -> Tensor:
    """(B, T, 3, S, S) normalised frames -> (B, T, L, D) ViT tokens (post-layernorm)."""
    b, t = pixel_values.shape[:2]
    weight = vit.embeddings.patch_embedding.weight
    x = pixel_values.flatten(0, 1).to(weight.device, weight.dtype)
    # Frames larger than the ViT was trained on (e.g. 364 px): interpolate position embeddings.
    resize = x.shape[-1] != trained_size
    with autocast(weight.device, dtype):
        tokens = vit(pixel_values=x, interpolate_pos_encoding=resize).last_hidden_state  # (B*T, L, D)
    return tokens.unflatten(0, (b, t))


def load_vision_model(pretrained: str | Path) -> tuple[Blip2VisionModel, Blip2Config]:
    """The `vision_model` of a BLIP-2 checkpoint (hub id or folder), fp32, from safetensors only."""
    config = Blip2Config.from_pretrained(str(pretrained))
    with torch.device("meta"):  # no random init of a 1B-parameter ViT: every tensor comes from the file
        vit = Blip2VisionModel(config.vision_config)
    state = {}

    for path in _vision_files(pretrained):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if key.startswith(PREFIX):
                    state[key[len(PREFIX) :]] = f.get_tensor(key).float()
    missing = sorted(set(vit.state_dict()) - set(state))
    if missing:
        raise ValueError(
            f"{pretrained}: the checkpoint has no {PREFIX}{missing[0]} (and {len(missing) - 1} more)"
        )
    vit.load_state_dict(state, strict=True, assign=True)
    return vit.eval().requires_grad_(False), config


def vision_files(pretrained: str | Path) -> list[Path]:
    """The safetensors files holding `vision_model.*` tensors (`pipeline.features` hashes them)."""
    return _vision_files(pretrained)


def _vision_files(pretrained: str | Path) -> list[Path]:
    """The safetensors files holding `vision_model.*` tensors: local, or downloaded from the hub."""
    folder = Path(pretrained)
    if not folder.is_dir():
        return _hub_vision_files(str(pretrained))
    if (folder / INDEX_FILE).exists():
        return _from_index(folder / INDEX_FILE, folder.joinpath)
    if (folder / SINGLE_FILE).exists():
        return [folder / SINGLE_FILE]
    raise FileNotFoundError(
        f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (vidcap loads safetensors only, never pickled .bin)"
    )


def _hub_vision_files(repo_id: str) -> list[Path]:

    def fetch(name: str) -> Path:
        return Path(huggingface_hub.hf_hub_download(repo_id, name))

    try:
        index = fetch(INDEX_FILE)
    except RemoteEntryNotFoundError:  # the hub has no index: a single-file checkpoint
        return [fetch(SINGLE_FILE)]
    except LocalEntryNotFoundError as offline:  # offline: a cached single file, or this error
        try:
            return [fetch(SINGLE_FILE)]
        except LocalEntryNotFoundError:
            raise offline from None
    return _from_index(index, fetch)


def _from_index(index: Path, fetch: Callable[[str], Path]) -> list[Path]:
    """Only the shards that hold ViT tensors (for BLIP-2 Flan-T5-XL, one of two)."""
    weight_map = json.loads(index.read_text())["weight_map"]
    return [fetch(name) for name in sorted({f for k, f in weight_map.items() if k.startswith(PREFIX)})]


class FrameEncoder(nn.Module):
    """The frozen ViT with `VideoCaptioner`'s frame interface: `encode_frames`, token shape, dtype."""

    def __init__(self, vision_model: Blip2VisionModel, config: Blip2Config, model_cfg: ModelConfig, device):
        super().__init__()
        device = torch.device(device or "cpu")
        self.vision_model = vision_model
        self.trained_size = config.vision_config.image_size
        self.vision_width = config.vision_config.hidden_size
        self.patch_size = config.vision_config.patch_size
        self.tokens_per_frame = tokens_per_frame(model_cfg.image_size, self.patch_size)
        self.compute_dtype = compute_dtype(model_cfg, device)
        if self.compute_dtype == torch.bfloat16:
            vision_model.to(torch.bfloat16)  # frozen: stored in the compute dtype, as in VideoCaptioner
        self.to(device)

    @classmethod
    def from_pretrained(cls, pretrained: str | Path, model_cfg: ModelConfig, device=None) -> FrameEncoder:
        vit, config = load_vision_model(pretrained)
        return cls(vit, config, model_cfg, device)

    def encode_frames(self, pixel_values: Tensor) -> Tensor:
        """(B, T, 3, S, S) normalised frames -> (B, T, L, D) ViT tokens (post-layernorm)."""
        return run_vit(self.vision_model, pixel_values, self.trained_size, self.compute_dtype)
