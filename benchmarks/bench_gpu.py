"""Full-size throughput on one GPU: the ViT-g extraction, CE training from cache vs video, captioning.

    python benchmarks/bench_gpu.py                                   # ViT-g + Flan-T5-XL shapes, CUDA, bf16
    python benchmarks/bench_gpu.py --preset vitg-opt-2.7b
    python benchmarks/bench_gpu.py --preset tiny-t5 --device cpu --quick   # smoke run, any machine

The model is a random BLIP-2 with the published shapes (`pipeline.demo.testmodels`, nothing is
downloaded), built directly on the device in bf16 (Q-Former fp32, as transformers keeps it);
frames are random normalised tensors, so decoding is not measured here (see
bench_extract.py / bench_caption.py for decode vs ViT on real videos). Timings are taken after
warm-up, with the device synchronised.

1. extract: the frozen ViT on (B, T, 3, 224, 224) frames through `FrameEncoder.encode_frames`
   (what `extract` runs): videos/s, frames/s, and the achieved fraction of the GPU's dense bf16
   peak (`--peak-tflops`, default from the device name), from the ViT's matmul FLOPs per frame.
2. train: CE steps/s of the Q-Former-only preset (`model.llm: frozen`), batch B x T frames, from
   cached tokens (float16 (B, T, L, D) as `train.source: cache` reads them) vs from frames
   (ViT every step, `train.source: video`); their ratio is what the cache buys.
3. caption: frames -> ViT -> beam search (5 beams, 5-32 new tokens) at batch sizes 1, 8, 32, 64:
   videos/s.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
CAPTIONS = ["a man is cooking pasta in a kitchen", "a dog runs across a green field"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="vitg-flan-t5-xl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="videos per ViT call and per training step")
    parser.add_argument("--caption-batches", default="1,8,32,64")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak (0: from the name)")
    parser.add_argument("--quick", action="store_true", help="fewer timed iterations")
    args = parser.parse_args()
    iters = 2 if args.quick else 10
    device = torch.device(args.device)
    model, encoder = build(args.preset, device, args.frames)
    size = model.blip.config.vision_config.image_size
    print(
        f"bench_gpu: {args.preset} on {describe(device)}; {args.frames} frames of {size} px, batch {args.batch}"
    )

    frames = torch.randn(args.batch, args.frames, 3, size, size, device=device)
    seconds = timed(lambda: encoder.encode_frames(frames), device, iters)
    peak = args.peak_tflops or peak_tflops(device)
    flops = vit_flops_per_frame(encoder) * args.batch * args.frames
    achieved = flops / seconds / 1e12
    share = f"{100 * achieved / peak:.1f}% of {peak:.0f}" if peak else "peak unknown (--peak-tflops)"
    print(f"extract: {args.batch / seconds:.1f} videos/s, {args.batch * args.frames / seconds:.0f} frames/s, "
          f"{achieved:.1f} TFLOP/s = {share} bf16 TFLOP/s")  # fmt: skip

    tokens = encoder.encode_frames(frames).to(torch.float16)  # (B, T, L, D), as the cache stores them
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]
    from_cache = timed(lambda: train_step(model, optimizer, tokens, captions), device, iters)
    from_video = timed(
        lambda: train_step(model, optimizer, model.encode_frames(frames), captions), device, iters
    )
    print(f"train (llm frozen): cache {1 / from_cache:.2f} steps/s, video {1 / from_video:.2f} steps/s, "
          f"cache/video {from_video / from_cache:.1f}x")  # fmt: skip

    model.eval()
    for batch in [int(b) for b in args.caption_batches.split(",")]:
        clip = torch.randn(batch, args.frames, 3, size, size, device=device)
        seconds = timed(
            lambda clip=clip: model.generate(model.encode_frames(clip), num_beams=5, max_new_tokens=32),
            device,
            max(1, iters // 5),
        )
        print(f"caption: batch {batch:>3}: {batch / seconds:.1f} videos/s")


def build(preset: str, device: torch.device, frames: int):
    """A random full-size (or tiny) BLIP-2 as a VideoCaptioner (Q-Former-only CE) and its ViT."""
    from pipeline.config import ModelConfig
    from pipeline.demo.testmodels import IMAGE_TOKEN, PRESETS, build_blip2, build_tokenizer
    from pipeline.model import VideoCaptioner
    from pipeline.vision import FrameEncoder

    flavour, tiny = PRESETS[preset].flavour, PRESETS[preset].tiny
    tokenizer = build_tokenizer(flavour, " ".join(CAPTIONS).split() + ["a", "video", "of"])
    dtype = torch.float32 if tiny or device.type == "cpu" else torch.bfloat16
    vocab = -(-len(tokenizer) // 8) * 8 if tiny else None
    blip = build_blip2(preset, vocab_size=vocab, device=device, dtype=dtype,
                       image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))  # fmt: skip
    size = blip.config.vision_config.image_size
    cfg = ModelConfig(pretrained=preset, num_frames=frames, image_size=size, llm="frozen")
    model = VideoCaptioner(blip, tokenizer, cfg, preset, device)
    encoder = FrameEncoder(blip.vision_model, blip.config, cfg, device)  # the same ViT, shared
    return model, encoder


def train_step(model, optimizer, tokens: torch.Tensor, captions: list[str]) -> None:
    model.train()
    loss = model.ce_loss(tokens, captions)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Seconds per call after one warm-up call, the device synchronised."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def vit_flops_per_frame(encoder) -> float:
    """Matmul FLOPs of one frame through the ViT: 2 x (linear weights) x tokens + attention scores."""
    vit = encoder.vision_model
    length = encoder.tokens_per_frame
    linear = sum(m.weight.numel() for m in vit.encoder.modules() if isinstance(m, torch.nn.Linear))
    layers = len(vit.encoder.layers)
    return 2.0 * linear * length + 4.0 * layers * length * length * encoder.vision_width


def peak_tflops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), 0.0)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"cpu, {torch.get_num_threads()} threads (torch {torch.__version__})"


if __name__ == "__main__":
    main()
