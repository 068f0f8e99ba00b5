"""What differs between the language models BLIP-2 and InstructBLIP drive: one row per LM.

    T5 (Flan-T5, encoder-decoder), OPT (decoder-only, BLIP-2), LLaMA (Vicuna, InstructBLIP)

Each row is data that `pipeline.model.VideoCaptioner` applies (how LAVIS's blip2_t5, blip2_opt and
blip2_vicuna_instruct drive the LM: terminator/EOS, the seed's prompt and minimum length, LoRA
target names). Torch-free, so `vidcap plan` reads it without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass

# ModelConfig's LoRA targets are written T5-style (`q`, `v`) by default; OPT and LLaMA name the
# same projections `q_proj`, `v_proj`, ... Names are mapped to the flavour at hand; names not in a
# flavour's table are used as given.
_OPT_LORA_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
_T5_LORA_NAMES = {v: k for k, v in _OPT_LORA_NAMES.items()} | {"o_proj": "o"}
_LLAMA_LORA_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "out_proj": "o_proj"}


@dataclass(frozen=True)
class Flavour:
    """How one kind of language model is driven, as LAVIS's blip2_t5 / blip2_opt / blip2_vicuna_instruct."""

    name: str
    decoder_only: bool
    """Decoder-only: [queries ; prompt ; caption] is one sequence; else queries and prompt feed the encoder."""
    terminator: str | None
    """Text ending every training target and used as the EOS of generation (None: the tokenizer's EOS)."""
    seed_prompt: str
    """`model.prompt` when unset: the seed configs' prompt for this LM."""
    seed_min_new_tokens: int
    """`min_new_tokens` when unset: the seed's `min_length=5` counted as LAVIS's generate counts it."""
    space_before_caption: bool
    """Byte-level BPE marks word starts with a space: a caption after a non-empty prompt starts with one."""
    lora_names: dict[str, str]
    """LoRA target names as written in `model.lora_target_modules` -> this LM's module names."""


FLAVOURS: dict[str, Flavour] = {
    # T5's decoder sequence starts with the decoder start token, which min_length counts: 4 new tokens.
    "t5": Flavour("t5", False, None, "a video of", 4, False, _T5_LORA_NAMES),
    # BLIP-2/LAVIS OPT: captions end with a newline (id 50118 in OPT's tokenizer), also the EOS.
    "opt": Flavour("opt", True, "\n", "", 5, True, _OPT_LORA_NAMES),
    # Vicuna (LLaMA) in InstructBLIP: `</s>` ends targets; SentencePiece adds its own word prefix.
    "llama": Flavour("llama", True, None, "", 5, False, _LLAMA_LORA_NAMES),
}


def flavour_of(text_model_type: str) -> Flavour:
    """The flavour of a checkpoint's language model (`config.text_config.model_type`)."""
    if text_model_type not in FLAVOURS:
        raise ValueError(
            f"language model {text_model_type!r} has no flavour in pipeline.flavours.FLAVOURS "
            f"(known: {', '.join(FLAVOURS)})"
        )
    return FLAVOURS[text_model_type]
