"""Memory per GPU of training a full-size model, COMPUTED from parameter counts and dtypes (not measured).

    python benchmarks/bench_memory.py                         # InstructBLIP Vicuna-7B
    python benchmarks/bench_memory.py --preset vitg-flan-t5-xl --gpus 1 8

The model is built on the meta device (shapes only). Per trainable parameter: fp32 weight (4 B) +
fp32 gradient (4 B) + AdamW's two fp32 moments (8 B) = 16 B; frozen parameters are stored in bf16
(2 B), except the ViT (fp32 weights under bf16 autocast: 4 B). The ViT is absent when training from the cache (`train.source: cache`). "replicated" is what
DDP holds on every GPU; "sharded" divides the trainable state over the GPUs (FSDP-style, frozen
weights replicated): `run.sharding: fsdp`. Activations, the CUDA
context and allocator slack come on top and depend on batch, frames and checkpointing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GB = 1e9
TRAINED_BYTES, FROZEN_BYTES = 16, 2
VIT_BYTES = 4  # a frozen ViT keeps fp32 weights under bf16 autocast (pipeline.vision's precision rule)


def counts(preset: str, lora_r: int, lora_targets: tuple[str, ...]) -> dict[str, int]:
    from pipeline.demo.testmodels import build_blip2

    model = build_blip2(preset, device="meta")
    lm = model.language_model
    lora = sum(
        lora_r * (m.in_features + m.out_features)
        for name, m in lm.named_modules()
        if name.rsplit(".", 1)[-1] in lora_targets and hasattr(m, "in_features")
    )
    return {
        "vit": sum(p.numel() for p in model.vision_model.parameters()),
        "qformer": sum(p.numel() for p in model.qformer.parameters())
        + model.query_tokens.numel()
        + sum(p.numel() for p in model.language_projection.parameters()),
        "llm": sum(p.numel() for p in lm.parameters()),
        "lora": lora,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vitg-vicuna-7b")
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--lora-r", type=int, default=8)
    args = parser.parse_args(argv)
    n = counts(args.preset, args.lora_r, ("q_proj", "v_proj", "q", "v"))
    print(f"bench_memory: {args.preset} (COMPUTED from parameter counts; activations not included)")
    print("  parameters: " + ", ".join(f"{k} {v / 1e6:,.1f}M" for k, v in n.items()))
    rows = {
        "frozen LLM (Q-Former only)": (n["qformer"], n["llm"]),
        f"LoRA r{args.lora_r} q,v": (n["qformer"] + n["lora"], n["llm"]),
        "full LLM": (n["qformer"] + n["llm"], 0),
    }
    for source, vit in (("cache", 0), ("video", n["vit"])):
        for name, (trained, frozen) in rows.items():
            frozen_gb = (frozen * FROZEN_BYTES + vit * VIT_BYTES) / GB
            replicated = trained * TRAINED_BYTES / GB + frozen_gb  # DDP: every GPU holds everything
            sharded = "  ".join(
                f"{gpus}: {trained * TRAINED_BYTES / gpus / GB + frozen_gb:6.1f} GB" for gpus in args.gpus
            )
            print(
                f"  from {source:<5} {name:<28} replicated (DDP) {replicated:6.1f} GB;  sharded over GPUs {sharded}"
            )


if __name__ == "__main__":
    main()
