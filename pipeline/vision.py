"""The frozen ViT on its own: what `extract` runs, loaded without the Q-Former and the LLM.

A BLIP-2 checkpoint stores the ViT under `vision_model.*` beside a language model that is 3-7x
larger (Flan-T5-XL, OPT-2.7B/6.7B). Extraction needs only the ViT, so `load_vision_model`
reads just those tensors from the safetensors files (and, from the hub, downloads just the
shards that hold them): every Dask worker then holds about 1B parameters instead of 4-8B.
`run_vit` is the one place frames go through a ViT, for `FrameEncoder` and `VideoCaptioner`.

Two checkpoint architectures carry the same kind of ViT under `vision_model.*`: BLIP-2
(`Blip2ForConditionalGeneration`) and InstructBLIP (`InstructBlipForConditionalGeneration`);
`ARCHITECTURES` maps a checkpoint's `model_type` to its transformers classes.

Precision (`VIT_PRECISION`): with bf16 compute the ViT keeps fp32 weights and runs under bf16
autocast, so its matmuls and convolutions run in bf16 while LayerNorms, position embeddings and
the residual stream stay fp32. `benchmarks/bench_precision.py` measured this closer to fp32 than
casting the whole ViT to bf16 (what vidcap did before) and than LAVIS's rule (Linear/Conv weights
in half precision: in transformers the embeddings then follow the patch weights' dtype, and the
residual stream is half precision from the first block on).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError
from safetensors import safe_open
from torch import Tensor, nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2VisionModel,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipVisionModel,
    PretrainedConfig,
)

from pipeline.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PREFIX = "vision_model."


@dataclass(frozen=True)
class Architecture:
    """The transformers classes of one checkpoint architecture (a `config.json` `model_type`)."""

    config: type
    vision_model: type
    model: type
    qformer_takes_text: bool  # InstructBLIP's Q-Former can also read the instruction's tokens


ARCHITECTURES: dict[str, Architecture] = {
    "blip-2": Architecture(Blip2Config, Blip2VisionModel, Blip2ForConditionalGeneration, False),
    "instructblip": Architecture(
        InstructBlipConfig, InstructBlipVisionModel, InstructBlipForConditionalGeneration, True
    ),
}

# What the cache fingerprint records as the ViT's precision (`compute_dtype`). The bf16 label
# changed with the precision rule, so a cache written under the old rule (whole ViT in bf16,
# recorded as plain "bfloat16") is refused: "compute_dtype: cache 'bfloat16', config '...'".
VIT_PRECISION = {
    None: "float32",
    torch.bfloat16: "bfloat16 autocast (fp32 weights, LayerNorms, position embeddings, residual stream)",
}


def architecture(pretrained: str | Path) -> Architecture:
    """The architecture of a checkpoint (hub id or folder), from its `config.json`'s `model_type`."""
    raw, _ = PretrainedConfig.get_config_dict(str(pretrained))
    model_type = raw.get("model_type", "")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{pretrained}: model_type {model_type!r} is not a BLIP-2 or InstructBLIP checkpoint "
            f"(vidcap reads {', '.join(ARCHITECTURES)})"
        )
    return ARCHITECTURES[model_type]


def compute_dtype(model_cfg: ModelConfig, device: torch.device) -> torch.dtype | None:
    """None: plain fp32. bf16 autocast on CUDA by default; never fp16 (T5 overflows)."""
    if model_cfg.dtype == "bfloat16" or (model_cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def frame_size(model_cfg: ModelConfig) -> int:
    """Side of the frames fed to the ViT: `model.image_size`, or when 0 the checkpoint's own.

    A ViT run at another size than it was trained at interpolates its position embeddings; the
    default never does that silently (a model trained at 364 px runs at 364 px).
    """
    return model_cfg.image_size or checkpoint_image_size(str(model_cfg.pretrained))


@functools.lru_cache(maxsize=64)
def checkpoint_image_size(pretrained: str) -> int:
    """The image size a checkpoint's ViT was trained at (`vision_config.image_size` in config.json)."""
    raw, _ = PretrainedConfig.get_config_dict(pretrained)
    return int(raw.get("vision_config", {}).get("image_size", 224))  # 224: transformers' default


def tokens_per_frame(image_size: int, patch_size: int) -> int:
    """ViT tokens per frame: the patches plus CLS (257 for EVA ViT-g at 224 px, patch 14)."""
    return (image_size // patch_size) ** 2 + 1


def run_vit(
    vit: nn.Module, pixel_values: Tensor, trained_size: int, dtype: torch.dtype | None, grad: bool = False
) -> Tensor:
    """(B, T, 3, S, S) normalised frames -> (B, T, L, D) ViT tokens (post-layernorm); with
    `grad` (a ViT being trained, `model.vit: full`) the tokens carry gradients to its weights."""
    b, t = pixel_values.shape[:2]
    weight = vit.embeddings.patch_embedding.weight
    x = pixel_values.flatten(0, 1).to(weight.device, weight.dtype)
    # Frames larger than the ViT was trained on (e.g. 364 px): interpolate position embeddings.
    resize = x.shape[-1] != trained_size
    with torch.set_grad_enabled(grad), autocast(weight.device, dtype):
        tokens = vit(pixel_values=x, interpolate_pos_encoding=resize).last_hidden_state  # (B*T, L, D)
    return tokens.unflatten(0, (b, t))


def load_vision_model(pretrained: str | Path) -> tuple[nn.Module, PretrainedConfig]:
    """The `vision_model` of a BLIP-2 / InstructBLIP checkpoint (hub id or folder), fp32, safetensors only."""
    arch = architecture(pretrained)
    config = arch.config.from_pretrained(str(pretrained))
    with torch.device("meta"):  # no random init of a 1B-parameter ViT: every tensor comes from the file
        vit = arch.vision_model(config.vision_config)
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

    def __init__(self, vision_model: nn.Module, config: PretrainedConfig, model_cfg: ModelConfig, device):
        super().__init__()
        device = torch.device(device or "cpu")
        self.vision_model = vision_model
        self.trained_size = config.vision_config.image_size
        self.vision_width = config.vision_config.hidden_size
        self.patch_size = config.vision_config.patch_size
        self.image_size = model_cfg.image_size or self.trained_size  # 0: the checkpoint's own
        self.tokens_per_frame = tokens_per_frame(self.image_size, self.patch_size)
        self.compute_dtype = compute_dtype(model_cfg, device)
        self.precision = VIT_PRECISION[self.compute_dtype]  # fp32 weights; bf16 only inside autocast
        self.to(device)

    @classmethod
    def from_pretrained(cls, pretrained: str | Path, model_cfg: ModelConfig, device=None) -> FrameEncoder:
        vit, config = load_vision_model(pretrained)
        return cls(vit, config, model_cfg, device)

    def encode_frames(self, pixel_values: Tensor) -> Tensor:
        """(B, T, 3, S, S) normalised frames -> (B, T, L, D) ViT tokens (post-layernorm)."""
        return run_vit(self.vision_model, pixel_values, self.trained_size, self.compute_dtype)
