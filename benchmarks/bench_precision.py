"""How far each ViT precision rule moves the cached tokens from an fp32 ViT.

    python benchmarks/bench_precision.py                    # mid-size random ViT, CPU
    python benchmarks/bench_precision.py --device cuda --model Salesforce/blip2-flan-t5-xl

The ViT is the `mid` one of `bench_extract.py` (width 384, 6 blocks, patch 16, 224 px -> 197
tokens per frame, random weights, init range 0.02) unless `--model` names a BLIP-2/InstructBLIP
checkpoint. Frames are random CLIP-normalised pixels (seeded). Every rule's tokens are rounded
to float16 as the cache stores them and compared with the fp32 ViT's:

    relative RMS = rms(tokens_rule - tokens_fp32) / rms(tokens_fp32)

Rules, for bf16 and fp16:
* `whole ViT in half`: every weight cast down (vidcap before issue 11), autocast on;
* `LAVIS (Linear/Conv half)`: only Linear and Conv2d weights cast down, LayerNorms and
  embeddings fp32, autocast on; transformers' embeddings then cast the class and position
  embeddings to the patch weights' dtype, so the residual stream is half precision;
* `fp32 weights + autocast` (vidcap's rule, `pipeline.vision.run_vit`): matmuls and convolutions
  in half precision, LayerNorms, embeddings and the residual stream fp32.
The first line is the floor: fp32 tokens rounded to float16 (what the cache costs anyway).
Numbers print; nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.vision import load_vision_model, run_vit  # noqa: E402

MID_VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                  patch_size=16, image_size=224, initializer_range=0.02)  # fmt: skip  # as bench_extract's


def mid_vit(seed: int) -> tuple[nn.Module, int]:
    from transformers import Blip2VisionConfig, Blip2VisionModel

    torch.manual_seed(seed)
    return Blip2VisionModel(Blip2VisionConfig(**MID_VISION)).eval(), MID_VISION["image_size"]


def cast_linear_conv(vit: nn.Module, dtype: torch.dtype) -> nn.Module:
    """LAVIS's `convert_weights_to_fp16`: Linear and Conv weights (and biases) only."""
    half = copy.deepcopy(vit)
    for module in half.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(dtype)
    return half


@torch.no_grad()
def tokens(vit: nn.Module, pixels: torch.Tensor, size: int, dtype: torch.dtype | None) -> torch.Tensor:
    """(B, T, L, D) tokens as the cache stores them (float16), through the shipped `run_vit`."""
    return run_vit(vit, pixels, size, dtype).to(torch.float16).float()


@torch.no_grad()
def relative_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="", help="BLIP-2/InstructBLIP checkpoint (default: the mid random ViT)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=8, help="frames of random pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.model:
        vit, config = load_vision_model(args.model)
        size = config.vision_config.image_size
    else:
        vit, size = mid_vit(args.seed)
    vit = vit.to(device)
    g = torch.Generator().manual_seed(args.seed)
    pixels = torch.randn(1, args.frames, 3, size, size, generator=g).to(device)  # (1, T, 3, S, S)
    with torch.no_grad():
        exact = run_vit(vit, pixels, size, None).float()  # fp32 reference, not rounded
    ref = exact.to(torch.float16).float()
    name = args.model or "mid random ViT (width 384, 6 blocks, 197 tokens)"
    print(f"bench_precision: {name} on {device}, {args.frames} frames; relative RMS vs fp32 tokens")
    print(f"  {'fp32 tokens stored as float16 (the floor)':<44} {relative_rms(ref, exact):.2e}")
    for dtype in (torch.bfloat16, torch.float16):
        label = str(dtype).removeprefix("torch.")
        rules = {
            "whole ViT in half": copy.deepcopy(vit).to(dtype),
            "LAVIS (Linear/Conv half)": cast_linear_conv(vit, dtype),
            "fp32 weights + autocast": vit,
        }
        for rule, model in rules.items():
            try:
                got = tokens(model, pixels, size, dtype)
            except RuntimeError as e:  # e.g. an fp16 kernel missing on this device
                print(f"  {label + ': ' + rule:<44} unavailable ({str(e).splitlines()[0][:60]})")
                continue
            print(f"  {label + ': ' + rule:<44} {relative_rms(got, exact):.2e}")


if __name__ == "__main__":
    main()
