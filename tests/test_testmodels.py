"""Tiny and full-size random BLIP-2 models: folders open with plain transformers, tokenizers
follow each LM's conventions, and the ViT carries signal (the initializer_range pitfall)."""

import json

import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    OPTForCausalLM,
    T5ForConditionalGeneration,
)

from pipeline.demo.testmodels import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_TOKEN,
    PRESETS,
    blip2_config,
    build_blip2,
    init_model,
)

CAPTIONS = [
    {"video": "v1.mp4", "caption": "A zebra juggles pineapples", "split": "train"},
    {"video": "v2.mp4", "captions": ["an octopus paints", "Quietly"], "meta": {"note": "xylophone"}},
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("testmodels")
    annotations = root / "ann.jsonl"
    annotations.write_text("\n".join(json.dumps(row) for row in CAPTIONS) + "\n")
    return {p: init_model(root / p, p, vocab_from=annotations, seed=0) for p in ("tiny-t5", "tiny-opt")}


@pytest.mark.parametrize(
    "preset, lm_class", [("tiny-t5", T5ForConditionalGeneration), ("tiny-opt", OPTForCausalLM)]
)
def test_folder_opens_with_plain_transformers(folders, preset, lm_class):
    model = Blip2ForConditionalGeneration.from_pretrained(folders[preset])
    tok = AutoTokenizer.from_pretrained(folders[preset])
    assert isinstance(model.language_model, lm_class)
    vocab = model.config.text_config.vocab_size
    assert vocab >= len(tok) and vocab % 8 == 0 and vocab - len(tok) < 8
    assert model.config.image_token_index == tok.convert_tokens_to_ids(IMAGE_TOKEN) < vocab
    assert model.config.num_query_tokens == 8 and model.query_tokens.shape == (1, 8, 32)
    assert model.config.qformer_config.cross_attention_frequency == 1
    text = model.config.text_config
    assert (text.d_model if preset == "tiny-t5" else text.hidden_size) == 64  # wider than the Q-Former


def test_t5_tokenizer_conventions_and_round_trip(folders):
    tok = AutoTokenizer.from_pretrained(folders["tiny-t5"])
    config = Blip2ForConditionalGeneration.from_pretrained(folders["tiny-t5"]).config.text_config
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (0, 1, 0)
    ids = tok("A zebra juggles PINEAPPLES").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids  # words from vocab_from, lowercased
    assert tok.decode(ids, skip_special_tokens=True) == "a zebra juggles pineapples"
    nested = tok("xylophone quietly octopus a video of", add_special_tokens=False).input_ids
    assert tok.unk_token_id not in nested and len(nested) == 6
    assert tok("flibbertigibbet", add_special_tokens=False).input_ids == [tok.unk_token_id]


def test_opt_tokenizer_prepends_bos(folders):
    tok = AutoTokenizer.from_pretrained(folders["tiny-opt"])
    config = Blip2ForConditionalGeneration.from_pretrained(folders["tiny-opt"]).config.text_config
    assert tok.bos_token_id == tok.eos_token_id == config.bos_token_id == config.eos_token_id == 2
    assert tok.pad_token_id == config.pad_token_id == 1
    ids = tok("an octopus paints").input_ids
    assert ids[0] == 2 and len(ids) == 4 and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "an octopus paints"


def test_vocab_from_text_file(tmp_path):
    lines = tmp_path / "captions.txt"
    lines.write_text("Narwhals tango\nquokka\n")
    tok = AutoTokenizer.from_pretrained(init_model(tmp_path / "m", "tiny-t5", vocab_from=lines))
    assert tok.unk_token_id not in tok("narwhals tango quokka").input_ids


def test_image_processor_matches_model(folders):
    assert (folders["tiny-t5"] / "preprocessor_config.json").exists()
    processor = AutoImageProcessor.from_pretrained(folders["tiny-t5"])
    assert (processor.size["height"], processor.size["width"]) == (32, 32)
    assert tuple(processor.image_mean) == pytest.approx(CLIP_MEAN)
    assert tuple(processor.image_std) == pytest.approx(CLIP_STD)


def test_vit_carries_signal(folders):
    model = Blip2ForConditionalGeneration.from_pretrained(folders["tiny-opt"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.vision_model(pixel_values=images).last_hidden_state
    assert tokens.shape == (2, 17, 32)  # (32/8)^2 patches + CLS
    assert tokens.std() > 0.5 and (tokens[0] - tokens[1]).abs().mean() > 0.1
    # The pitfall this guards against: transformers' default init range makes the ViT output ~0.
    config = blip2_config("tiny-opt", vocab_size=64)
    config.vision_config.initializer_range = 1e-10
    torch.manual_seed(0)
    silent = Blip2ForConditionalGeneration(config).vision_model
    with torch.no_grad():
        assert silent(pixel_values=images).last_hidden_state.std() < 1e-2


def test_random_queries_are_distinct():
    model = build_blip2("tiny-t5", vocab_size=64)
    queries = model.query_tokens[0]
    assert (queries[0] - queries[1]).abs().max() > 1e-3  # transformers' init would make them all zero


def test_build_in_bf16_keeps_qformer_fp32():
    model = build_blip2("tiny-t5", vocab_size=64, dtype=torch.bfloat16)
    assert model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.vision_model.post_layernorm.weight.dtype == torch.bfloat16
    assert model.qformer.layernorm.weight.dtype == model.query_tokens.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32


def test_build_is_seeded():
    a, b = build_blip2("tiny-opt", vocab_size=64, seed=3), build_blip2("tiny-opt", vocab_size=64, seed=3)
    c = build_blip2("tiny-opt", vocab_size=64, seed=4)
    assert torch.equal(a.qformer.layernorm.weight, b.qformer.layernorm.weight)
    assert torch.equal(a.language_projection.weight, b.language_projection.weight)
    assert not torch.equal(a.language_projection.weight, c.language_projection.weight)


@pytest.mark.parametrize(
    "preset, lm_params",
    [("vitg-flan-t5-xl", (2.7e9, 2.9e9)), ("vitg-opt-2.7b", (2.6e9, 2.7e9))],
)
def test_full_size_shapes_on_meta(preset, lm_params):
    model = build_blip2(preset, device="meta")
    config = model.config
    vision = config.vision_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.intermediate_size) == (39, 1408, 6144)
    assert (vision.image_size // vision.patch_size) ** 2 + 1 == 257
    assert config.num_query_tokens == 32 and config.qformer_config.hidden_size == 768
    assert (
        config.qformer_config.cross_attention_frequency == 2
        and config.qformer_config.encoder_hidden_size == 1408
    )
    vit = sum(p.numel() for p in model.vision_model.parameters())
    assert 0.98e9 < vit < 1.0e9  # EVA ViT-g/14 without its last block: ~986M
    lm = sum(p.numel() for p in model.language_model.parameters())
    assert lm_params[0] < lm < lm_params[1]
    if preset == "vitg-flan-t5-xl":
        text = config.text_config
        assert (text.d_model, text.d_ff, text.num_layers, text.num_heads, text.vocab_size) == (
            2048,
            5120,
            24,
            32,
            32128,
        )
        assert text.is_gated_act and not config.use_decoder_only_language_model
    else:
        assert config.text_config.vocab_size == 50272 and config.use_decoder_only_language_model


def test_tiny_instructblip_folder_opens_with_plain_transformers(tmp_path):
    from transformers import InstructBlipForConditionalGeneration, LlamaForCausalLM

    folder = init_model(tmp_path / "ib", "tiny-instructblip", seed=0)
    model = InstructBlipForConditionalGeneration.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    qformer_tok = AutoTokenizer.from_pretrained(folder, subfolder="qformer_tokenizer")
    assert isinstance(model.language_model, LlamaForCausalLM)
    assert tok("a video of").input_ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    ids = qformer_tok("a video of").input_ids
    assert ids[0] == qformer_tok.cls_token_id and ids[-1] == qformer_tok.sep_token_id and len(ids) == 5
    assert model.config.qformer_config.vocab_size >= len(qformer_tok)
    assert model.config.image_token_index == tok.convert_tokens_to_ids(IMAGE_TOKEN)


def test_vicuna_7b_shapes_on_meta():
    model = build_blip2("vitg-vicuna-7b", device="meta")
    assert type(model).__name__ == "InstructBlipForConditionalGeneration"
    vit = sum(p.numel() for p in model.vision_model.parameters())
    lm = sum(p.numel() for p in model.language_model.parameters())
    assert 0.98e9 < vit < 1.0e9 and 6.7e9 < lm < 6.8e9  # LLaMA-7B: 6.74B
    assert model.config.text_config.model_type == "llama" and model.config.use_decoder_only_language_model


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="tiny-t5"):
        build_blip2("tiny-llama")
    assert set(PRESETS) >= {"tiny-t5", "tiny-opt", "vitg-flan-t5-xl", "vitg-opt-2.7b"}
