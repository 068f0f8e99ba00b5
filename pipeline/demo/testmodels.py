"""Randomly initialised BLIP-2 and InstructBLIP models built from configs: tiny ones for tests
and the demo, full-size ones (published shapes, random weights) for GPU speed and memory benchmarks.

Nothing is downloaded. `init_model` writes an ordinary Hugging Face folder that plain
`Blip2ForConditionalGeneration.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`
open, so the loading code under test is the real one:

    vidcap init-model runs/tiny --preset tiny-t5 --vocab-from annotations.jsonl

A tiny model gets its own word-level tokenizer (the real T5 / OPT tokenizers need files
from the hub) whose special tokens follow the language model's conventions:

* T5:  `<pad>`=0, `</s>`=1 (eos), `<unk>`=2; decoder start = pad; `</s>` appended to every text.
* OPT: `<s>`=0, `<pad>`=1, `</s>`=2 (bos and eos), `<unk>`=3; `</s>` prepended to every text;
  a newline token (an ordinary, non-special token, as OPT's id 50118): BLIP-2's OPT ends captions
  with it and generates with it as EOS.
* LLaMA (Vicuna, in InstructBLIP): `<unk>`=0 (also pad), `<s>`=1 (bos), `</s>`=2 (eos); `<s>`
  prepended to every text. InstructBLIP folders also hold the Q-Former's own BERT-style tokenizer
  (`[PAD]`, `[UNK]`, `[CLS]`, `[SEP]`; `[CLS] text [SEP]`) in `qformer_tokenizer/`, as
  `InstructBlipProcessor` saves it.

Both also carry an `<image>` token (`config.image_token_index`), the placeholder the
transformers 5 BLIP-2 processor puts where the query outputs go.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    InstructBlipConfig,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from pipeline.vision import ARCHITECTURES

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"
NEWLINE = "\n"

# Random ViTs need a real init scale: Blip2VisionConfig's default initializer_range is
# 1e-10, which makes a random ViT output ~0 everywhere (no signal reaches the Q-Former).
RANDOM_INIT_RANGE = 0.02


@dataclass(frozen=True)
class Preset:
    """One named BLIP-2 / InstructBLIP configuration: keyword arguments of each sub-config."""

    flavour: str  # "t5" (encoder-decoder), "opt" or "llama" (decoder-only): pipeline.model.FLAVOURS
    vision: dict[str, Any]
    qformer: dict[str, Any]
    text: dict[str, Any]
    num_query_tokens: int
    tiny: bool
    image_token_index: int | None = None  # full-size: the id the published tokenizers use
    architecture: str = "blip-2"  # or "instructblip" (pipeline.vision.ARCHITECTURES)
    notes: str = field(default="", compare=False)


_TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    patch_size=8, image_size=32)  # fmt: skip  # (32/8)^2 + CLS = 17 tokens per frame
# A 0.2 init range (not 0.02) so the random Q-Former's output visibly depends on the frames:
# fusion and frame-order tests are meaningless when cross-attention is ~0.
_TINY_QFORMER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     cross_attention_frequency=1, max_position_embeddings=64, initializer_range=0.2)  # fmt: skip
# The LM is wider than the Q-Former (64 vs 32) so a mixed-up width fails loudly in tests.
_TINY_T5 = dict(d_model=64, d_ff=96, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
_TINY_OPT = dict(hidden_size=64, word_embed_proj_dim=64, ffn_dim=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=256,
                 pad_token_id=1, bos_token_id=2, eos_token_id=2)  # fmt: skip
_TINY_LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip

# EVA ViT-g/14 (39 blocks, width 1408, 224 px -> 256 patches + CLS = 257 tokens) and a
# BERT-base Q-Former with cross-attention every 2nd layer: Blip2*Config's defaults.
_VITG = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
             patch_size=14, image_size=224)  # fmt: skip
_QFORMER_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     cross_attention_frequency=2)  # fmt: skip
_FLAN_T5_XL = dict(d_model=2048, d_ff=5120, d_kv=64, num_layers=24, num_decoder_layers=24, num_heads=32,
                   feed_forward_proj="gated-gelu", vocab_size=32128, tie_word_embeddings=False,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
_OPT_2_7B = dict(hidden_size=2560, word_embed_proj_dim=2560, ffn_dim=10240, num_hidden_layers=32,
                 num_attention_heads=32, vocab_size=50272, max_position_embeddings=2048,
                 pad_token_id=1, bos_token_id=2, eos_token_id=2)  # fmt: skip
# Vicuna-7B (LLaMA-7B shapes; InstructBLIP's tokenizer adds a pad token: 32,001 ids).
_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32001, max_position_embeddings=2048,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip

PRESETS: dict[str, Preset] = {
    "tiny-t5": Preset("t5", _TINY_VISION, _TINY_QFORMER, _TINY_T5, num_query_tokens=8, tiny=True),
    "tiny-opt": Preset("opt", _TINY_VISION, _TINY_QFORMER, _TINY_OPT, num_query_tokens=8, tiny=True),
    "vitg-flan-t5-xl": Preset(
        "t5",
        _VITG,
        _QFORMER_BASE,
        _FLAN_T5_XL,
        num_query_tokens=32,
        tiny=False,
        image_token_index=32100,
        notes="Salesforce/blip2-flan-t5-xl shapes, ~3.9B parameters",
    ),
    "vitg-opt-2.7b": Preset(
        "opt",
        _VITG,
        _QFORMER_BASE,
        _OPT_2_7B,
        num_query_tokens=32,
        tiny=False,
        image_token_index=50265,
        notes="Salesforce/blip2-opt-2.7b shapes, ~3.7B parameters",
    ),
    "tiny-instructblip": Preset(
        "llama",
        _TINY_VISION,
        _TINY_QFORMER,
        _TINY_LLAMA,
        num_query_tokens=8,
        tiny=True,
        architecture="instructblip",
    ),
    "vitg-vicuna-7b": Preset(
        "llama",
        _VITG,
        _QFORMER_BASE,
        _VICUNA_7B,
        num_query_tokens=32,
        tiny=False,
        architecture="instructblip",
        notes="Salesforce/instructblip-vicuna-7b shapes, ~7.9B parameters",
    ),
}
_TEXT_CONFIGS: dict[str, type[PretrainedConfig]] = {"t5": T5Config, "opt": OPTConfig, "llama": LlamaConfig}

# Special tokens per flavour, in id order (ids 0..n-1), and the roles they play.
_SPECIALS = {
    "t5": (["<pad>", "</s>", "<unk>"], dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")),
    "opt": (
        ["<s>", "<pad>", "</s>", "<unk>"],
        dict(pad_token="<pad>", bos_token="</s>", eos_token="</s>", unk_token="<unk>"),
    ),
    "llama": (
        ["<unk>", "<s>", "</s>"],
        dict(pad_token="<unk>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
    ),
}
_QFORMER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]

# Always in the tiny vocabulary, so any config's prompt and typical captions tokenise.
_BASE_TEXT = """
a an the of in on at to and with is are was be by for from into onto over under up down out
video photo clip picture image scene this that there it its his her their he she they them
man woman men women person people boy girl child children kid baby player team group crowd
dog cat horse bird car bus truck bike ball game food water road street room table kitchen stage
is are walks walking runs running plays playing talks talking sings singing dances dancing cooks
cooking rides riding drives driving shows showing moves moving sits sitting stands standing holds
holding looks looking goes going red blue green yellow white black small big large left right
circle square moving across screen background . , ' s
"""
BASE_WORDS = tuple(_BASE_TEXT.split())

_WORD = re.compile(r"[a-z]+")


def _words_from(path: str | Path) -> list[str]:
    """Alphabetic words of a captions file: every string value of JSON / JSONL, or text lines."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    strings: list[str] = []
    if path.suffix in (".json", ".jsonl"):
        docs = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if path.suffix == ".jsonl"
            else [json.loads(text)]
        )
        for doc in docs:
            _collect_strings(doc, strings)
    else:
        strings = text.splitlines()
    return [w for s in strings for w in _WORD.findall(s.lower())]


def _collect_strings(node: Any, out: list[str]) -> None:
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, dict):
        for value in node.values():
            _collect_strings(value, out)
    elif isinstance(node, list):
        for value in node:
            _collect_strings(value, out)


def build_tokenizer(flavour: str, words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (lowercase, whitespace split) with the flavour's special tokens."""

    specials, roles = _SPECIALS[flavour]
    vocab = {token: i for i, token in enumerate(specials)}
    for word in sorted(set(words) - set(vocab)):
        vocab[word] = len(vocab)
    vocab[IMAGE_TOKEN] = len(vocab)
    if flavour == "opt":
        vocab[NEWLINE] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if flavour == "opt":  # matched before whitespace splitting (which would drop it)
        tok.add_tokens([AddedToken(NEWLINE, normalized=False, special=False)])
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    eos = ("</s>", vocab["</s>"])  # T5's; the decoder-only LMs prepend their bos instead
    if flavour == "t5":  # like T5's tokenizer: append </s>
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[eos]
        )
    else:  # like OPT's (GPT-2) tokenizer: prepend </s> as bos; LLaMA's: prepend <s>
        bos = roles["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right" if flavour == "t5" else "left",
        **roles,
    )


def build_qformer_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """InstructBLIP's Q-Former tokenizer in miniature: word-level, `[CLS] text [SEP]` (BERT's form)."""
    vocab = {token: i for i, token in enumerate(_QFORMER_SPECIALS)}
    for word in sorted(set(words) - set(vocab)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def blip2_config(
    preset: str,
    vocab_size: int | None = None,
    image_token_index: int | None = None,
    qformer_vocab_size: int | None = None,
) -> PretrainedConfig:
    """The Blip2Config (InstructBlipConfig for InstructBLIP presets) of a preset; `vocab_size`
    overrides the LM's and `qformer_vocab_size` the InstructBLIP Q-Former's (tiny: the tokenizers')."""
    p = _preset(preset)
    text = dict(p.text)
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    text_config = _TEXT_CONFIGS[p.flavour](**text)
    if p.architecture == "instructblip":
        qformer = {**p.qformer, **({"vocab_size": qformer_vocab_size} if qformer_vocab_size else {})}
        return InstructBlipConfig(
            vision_config=InstructBlipVisionConfig(**p.vision, initializer_range=RANDOM_INIT_RANGE).to_dict(),
            qformer_config=InstructBlipQFormerConfig(**qformer, pad_token_id=0).to_dict(),
            text_config=text_config.to_dict(),
            num_query_tokens=p.num_query_tokens,
            image_token_index=image_token_index if image_token_index is not None else p.image_token_index,
        )
    vision = Blip2VisionConfig(**p.vision, initializer_range=RANDOM_INIT_RANGE)
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=Blip2QFormerConfig(**p.qformer).to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=p.num_query_tokens,
        image_token_index=image_token_index if image_token_index is not None else p.image_token_index,
    )


def build_blip2(
    preset: str,
    vocab_size: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    image_token_index: int | None = None,
    qformer_vocab_size: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised BLIP-2 (or InstructBLIP), built directly in `dtype` (Q-Former and
    queries stay fp32, as transformers keeps them). `device="meta"` gives the full-size shapes
    without memory; `device="cuda", dtype=torch.bfloat16` a full-size model for GPU benchmarks
    (~8 GB; Vicuna-7B ~16 GB)."""
    p = _preset(preset)
    config = blip2_config(preset, vocab_size, image_token_index, qformer_vocab_size)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    try:  # building in the target dtype avoids a 16 GB fp32 copy of the full-size models
        torch.set_default_dtype(dtype or default_dtype)
        with torch.device(device or "cpu"):
            model = ARCHITECTURES[p.architecture].model(config)
    finally:
        torch.set_default_dtype(default_dtype)
    if str(device) != "meta":
        # Pretrained BLIP-2 queries are distinct vectors; transformers zero-inits them, which
        # makes every random query identical. LAVIS inits them N(0, 0.02).
        with torch.no_grad():
            model.query_tokens.normal_(0.0, config.qformer_config.initializer_range)
            if p.tiny and p.flavour == "t5":
                # T5 inits an untied lm_head with std 1: logits of std ~sqrt(d_model), so a random
                # model emits one token with probability ~1. Scale like a tied head instead.
                head = model.language_model.get_output_embeddings().weight
                head.normal_(0.0, config.text_config.d_model**-0.5)
    model.query_tokens.data = model.query_tokens.data.float()
    model.qformer.float()
    return model.eval()


def init_model(
    out_dir: str | Path,
    preset: str,
    vocab_from: str | Path | None = None,
    seed: int = 0,
    prompt: str = "a video of",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a random BLIP-2 + tokenizer + image processor as an ordinary Hugging Face folder.

    Tiny presets: fp32, vocabulary = prompt + `vocab_from` words + BASE_WORDS, LM vocab = tokenizer
    size rounded up to a multiple of 8. Full-size presets are written too (for GPU benchmarks of
    the whole pipeline), in bfloat16 unless `dtype` says otherwise (~8 GB); their word-level
    tokenizer uses only the first ids of the published vocabulary.
    """
    p = _preset(preset)
    out = Path(out_dir)
    words = _WORD.findall(prompt.lower()) + list(BASE_WORDS) + (_words_from(vocab_from) if vocab_from else [])
    tokenizer = build_tokenizer(p.flavour, words)
    qformer_tokenizer = build_qformer_tokenizer(words) if p.architecture == "instructblip" else None
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    qformer_vocab = None
    if p.tiny:
        vocab_size, dtype = -(-len(tokenizer) // 8) * 8, dtype or torch.float32
        qformer_vocab = -(-len(qformer_tokenizer) // 8) * 8 if qformer_tokenizer else None
    else:
        vocab_size, dtype = None, dtype or torch.bfloat16
        print(f"init_model: building {preset} ({p.notes}) in {dtype}; this takes minutes", file=sys.stderr)
    model = build_blip2(
        preset, vocab_size=vocab_size, seed=seed, dtype=dtype, image_token_index=image_id,
        qformer_vocab_size=qformer_vocab,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _save_image_processor(
        out, model.config.vision_config.image_size, tokenizer, p.num_query_tokens, qformer_tokenizer
    )
    return out


def _save_image_processor(
    out: Path, image_size: int, tokenizer: Any, num_query_tokens: int, qformer_tokenizer: Any = None
) -> None:
    """The image processor (model's image size, CLIP mean/std, bicubic) as `preprocessor_config.json`,
    and the Blip2Processor / InstructBlipProcessor (`processor_config.json`, what transformers 5
    writes; InstructBLIP's also writes `qformer_tokenizer/`) around it."""

    images = BlipImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    images.save_pretrained(out)
    if qformer_tokenizer is not None:
        InstructBlipProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            qformer_tokenizer=qformer_tokenizer,
            num_query_tokens=num_query_tokens,
        ).save_pretrained(out)
        return
    Blip2Processor(
        image_processor=images, tokenizer=tokenizer, num_query_tokens=num_query_tokens
    ).save_pretrained(out)


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
