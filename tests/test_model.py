"""The video model on tiny random BLIP-2s (T5 and OPT flavours): fusion, equivalence with the
plain transformers forward, decoding, gradients, trainable sets, and the export format."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Blip2ForConditionalGeneration

from pipeline.config import ModelConfig
from pipeline.demo.testmodels import IMAGE_TOKEN, init_model
from pipeline.model import EXPORT_FILE, LORA_DIR, VideoCaptioner

CAPTIONS = ["a man is walking", "a dog runs across the road to the kitchen"]
FLAVOURS = ("tiny-t5", "tiny-opt")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {p: str(init_model(root / p, p, seed=1)) for p in FLAVOURS}


def make(folder, load_vision=True, **settings) -> VideoCaptioner:
    cfg = ModelConfig(pretrained=folder, image_size=32, **{"num_frames": 3, **settings})
    return VideoCaptioner.from_pretrained(folder, cfg, load_vision=load_vision)


def tokens(b=2, t=3, seed=0):
    return torch.randn(b, t, 17, 32, generator=torch.Generator().manual_seed(seed))  # (B, T, L, D)


def perturb(model, seed=0):
    """Random values in every trainable tensor (LoRA B and temporal embeddings start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------
# Fusion
# --------------------------------------------------------------------------------------------


def test_concat_is_frame_order_invariant_without_temporal_embeddings(folders):
    model = make(folders["tiny-t5"])
    x = tokens()
    fused = model.fuse_frame_tokens(x)
    assert fused.shape == (2, 3 * 17, 32) and torch.equal(fused[:, :17], x[:, 0])  # frame 0 first
    permuted = x[:, [2, 0, 1]]
    torch.testing.assert_close(model.query_outputs(permuted), model.query_outputs(x), atol=1e-5, rtol=1e-5)
    assert (model.query_outputs(tokens(seed=1)) - model.query_outputs(x)).abs().max() > 1e-2  # frames matter


def test_temporal_embeddings_start_neutral_then_break_invariance(folders):
    plain, timed = make(folders["tiny-t5"]), make(folders["tiny-t5"], temporal_embeddings=True)
    x = tokens()
    assert timed.temporal_embeddings.shape == (3, 32) and timed.temporal_embeddings.requires_grad
    torch.testing.assert_close(timed.query_outputs(x), plain.query_outputs(x))  # zero init: unchanged
    with torch.no_grad():
        timed.temporal_embeddings.normal_(0.0, 1.0)
    permuted = x[:, [2, 0, 1]]
    assert (timed.query_outputs(permuted) - timed.query_outputs(x)).abs().max() > 1e-3


def test_mean_fusion_shapes(folders):
    model = make(folders["tiny-opt"], fusion="mean")
    x = tokens()
    torch.testing.assert_close(model.fuse_frame_tokens(x), x.mean(1))  # (B, L, D)
    assert model.query_outputs(x).shape == (2, 8, 64)  # (B, Q, H_llm)


def test_wrong_cache_shape_is_reported(folders):
    model = make(folders["tiny-t5"])
    assert (model.tokens_per_frame, model.vision_width, model.num_query_tokens) == (17, 32, 8)
    with pytest.raises(ValueError, match="L=17"):
        model.query_outputs(torch.randn(1, 3, 16, 32))


def test_encode_frames_matches_vision_model(folders):
    model = make(folders["tiny-t5"])
    pixels = torch.randn(2, 3, 3, 32, 32)
    out = model.encode_frames(pixels)
    assert out.shape == (2, 3, 17, 32) and not out.requires_grad
    with torch.no_grad():
        expected = model.blip.vision_model(pixel_values=pixels[1]).last_hidden_state
    torch.testing.assert_close(out[1], expected)


# --------------------------------------------------------------------------------------------
# Equivalence with plain transformers for one frame (guards against transformers upgrades)
# --------------------------------------------------------------------------------------------


def _hf_inputs(tok, flavour, q, prompt, captions, terminator=None):
    """Build what the BLIP-2 processor would: Q `<image>` placeholders, then the text.

    OPT targets as BLIP-2/LAVIS write them: `</s>` + prompt + caption + the newline terminator
    (the caption's first word carries BPE's word-start space only after a non-empty prompt)."""
    image = [tok.convert_tokens_to_ids(IMAGE_TOKEN)] * q
    prompt_ids = tok(prompt).input_ids  # T5: + </s>; OPT: </s> + ...
    if flavour == "tiny-t5":
        labels = [tok(c).input_ids for c in captions]  # caption + </s>
        width = max(map(len, labels))
        return {
            "input_ids": torch.tensor([image + prompt_ids] * len(captions)),
            "labels": torch.tensor([row + [-100] * (width - len(row)) for row in labels]),
        }
    rows = [
        image
        + prompt_ids
        + tok((" " + c) if prompt else c, add_special_tokens=False).input_ids
        + [terminator]
        for c in captions
    ]
    width = max(map(len, rows))
    prefix = len(image + prompt_ids)
    return {
        "input_ids": torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([[-100] * prefix + r[prefix:] + [-100] * (width - len(r)) for r in rows]),
    }


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_single_frame_ce_loss_equals_transformers_forward(folders, flavour):
    model = make(folders[flavour], num_frames=1)
    blip = Blip2ForConditionalGeneration.from_pretrained(folders[flavour]).eval()
    tok = AutoTokenizer.from_pretrained(folders[flavour])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.ce_loss(model.encode_frames(pixels[:, None]), CAPTIONS)
        theirs = blip(
            pixel_values=pixels, **_hf_inputs(tok, flavour, 8, model.prompt, CAPTIONS, model.eos_token_id)
        ).loss
    assert 2.0 < theirs.item() < 10.0
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Decoding and sequence log-probabilities
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_generate_greedy_beam_and_sampling(folders, flavour):
    model = make(folders[flavour])
    x = tokens()
    tok = model.tokenizer
    torch.manual_seed(0)  # sampling
    for kwargs, n in [
        (dict(num_beams=1), 2),
        (dict(num_beams=3), 2),
        (dict(num_beams=1, do_sample=True, num_return_sequences=3, top_p=0.9), 6),
    ]:
        out = model.generate(x, max_new_tokens=6, min_new_tokens=2, **kwargs)
        assert len(out.texts) == n and out.token_ids.shape[0] == n and out.token_ids.shape[1] <= 6
        assert out.texts == [t.strip() for t in tok.batch_decode(out.token_ids, skip_special_tokens=True)]
        # The random OPT may emit `</s>` (special, decoded as ""): BLIP-2's OPT stops at "\n" instead.
        assert (all(out.texts) or flavour == "tiny-opt") and not out.token_ids.requires_grad
        if flavour == "tiny-t5":  # the decoder start token is not part of the caption
            assert not (out.token_ids[:, 0] == model.blip.config.text_config.decoder_start_token_id).all()
    sampled = model.generate(x, num_beams=1, do_sample=True, num_return_sequences=4, max_new_tokens=6)
    assert len(set(sampled.texts[:4])) > 1  # samples of one video differ


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_min_new_tokens_is_respected(folders, flavour):
    model = make(folders[flavour])
    eos = model.eos_token_id

    def favour_eos(module, args, logits):  # make EOS the most likely token at every step
        logits[..., eos] += 100.0
        return logits

    handle = model.language_model.get_output_embeddings().register_forward_hook(favour_eos)
    try:
        for beams in (1, 3):
            eager = model.generate(tokens(), num_beams=beams, min_new_tokens=0, max_new_tokens=8)
            assert (eager.token_ids[:, 0] == eos).all() and eager.texts == ["", ""]
            held = model.generate(tokens(), num_beams=beams, min_new_tokens=4, max_new_tokens=8)
            assert (held.token_ids[:, :4] != eos).all() and (held.token_ids[:, 4] == eos).all()
    finally:
        handle.remove()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sequence_logprobs_match_generation_scores_and_carry_grad(folders, flavour):
    model = make(folders[flavour], temporal_embeddings=True)
    x = tokens()
    torch.manual_seed(0)
    greedy = model.generate(x, num_beams=1, max_new_tokens=7, min_new_tokens=2, output_logprobs=True)
    torch.testing.assert_close(
        model.sequence_logprobs(x, greedy.token_ids), greedy.logprobs, atol=1e-4, rtol=1e-5
    )
    sampled = model.generate(
        x, num_beams=1, do_sample=True, num_return_sequences=3, max_new_tokens=7, output_logprobs=True
    )
    scores = model.sequence_logprobs(x, sampled.token_ids, repeats=3)
    assert scores.shape == (6,) and (scores < 0).all()
    torch.testing.assert_close(scores.detach(), sampled.logprobs, atol=1e-4, rtol=1e-5)

    scores.sum().backward()
    assert model.blip.qformer.layernorm.weight.grad.abs().sum() > 0
    assert model.blip.query_tokens.grad.abs().sum() > 0 and model.temporal_embeddings.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.blip.vision_model.parameters())
    assert all(p.grad is None for p in model.language_model.parameters())  # frozen LLM


@torch.no_grad()
def test_sequence_logprobs_score_the_distribution_that_sampled(folders):
    """Temperature and min_new_tokens as generate applies them: logits / T, no EOS before the minimum."""
    model = make(folders["tiny-t5"])
    x = tokens()
    greedy = model.generate(x, num_beams=1, max_new_tokens=7, min_new_tokens=3)
    plain = model.sequence_logprobs(x, greedy.token_ids)
    at_min = model.sequence_logprobs(x, greedy.token_ids, min_new_tokens=3)
    cold = model.sequence_logprobs(x, greedy.token_ids, temperature=0.05, min_new_tokens=3)
    hot = model.sequence_logprobs(x, greedy.token_ids, temperature=2.0, min_new_tokens=3)
    # The greedy tokens are the argmax of that distribution, whose probability falls as T rises.
    assert (cold > at_min).all() and (at_min > hot).all() and (at_min > plain).all()
    # Forbidding EOS at the first position renormalises it: log p - log(1 - p_eos). Position 0
    # sees only the decoder start token, so p_eos there is the first target's EOS probability.
    ids = greedy.token_ids.to(model.device)
    eos = torch.full_like(ids, model.eos_token_id)
    mask = torch.ones_like(ids, dtype=torch.bool)
    p_eos = model._caption_token_logprobs(model.query_outputs(x), eos, mask).exp()[:, 0]  # (B,)
    expected = plain - torch.log1p(-p_eos)
    torch.testing.assert_close(model.sequence_logprobs(x, greedy.token_ids, min_new_tokens=1), expected)


def test_sequence_logprobs_stop_at_first_eos(folders):
    model = make(folders["tiny-opt"])
    eos, pad = model.eos_token_id, model.tokenizer.pad_token_id
    words = model.tokenizer("a man is walking", add_special_tokens=False).input_ids
    ended = torch.tensor([words + [eos, pad, pad], words + [eos, 9, 10]])
    with torch.no_grad():
        scores = model.sequence_logprobs(tokens(b=1), ended, repeats=2)
        unfinished = model.sequence_logprobs(tokens(b=1), torch.tensor([words]))
    torch.testing.assert_close(scores[0], scores[1])  # tokens after EOS do not count
    assert scores[0] < unfinished[0]  # EOS's own log-prob is included


# --------------------------------------------------------------------------------------------
# Trainable parameters
# --------------------------------------------------------------------------------------------


def _names(module, prefix):
    return {f"{prefix}.{n}" for n, _ in module.named_parameters()}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("llm", ["frozen", "lora", "full"])
def test_trainable_sets(folders, flavour, llm):
    model = make(folders[flavour], llm=llm, temporal_embeddings=True)
    blip = model.blip
    always = _names(blip.qformer, "blip.qformer") | _names(
        blip.language_projection, "blip.language_projection"
    )
    always |= {"blip.query_tokens", "temporal_embeddings"}
    lm_names = _names(blip.language_model, "blip.language_model")
    if llm == "frozen":
        expected = always
    elif llm == "full":
        expected = always | lm_names
    else:  # LoRA A and B on every q and v projection of every attention block
        targets = ("q", "v") if flavour == "tiny-t5" else ("q_proj", "v_proj")
        lora = {n for n in lm_names if ".lora_" in n}
        assert lora and all(n.split(".lora_")[0].rsplit(".", 1)[-1] in targets for n in lora)
        # T5: encoder self-attn + decoder self- and cross-attn; OPT: self-attn. 2 layers each.
        blocks = (2 + 2 * 2) if flavour == "tiny-t5" else 2
        assert len(lora) == blocks * len(targets) * 2
        expected = always | lora
    state = model.trainable_state_dict()
    assert set(state) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert not any("vision_model" in n for n in state)


def test_lora_targets_are_mapped_and_checked(folders):
    opt = make(folders["tiny-opt"], llm="lora", lora_target_modules=["q", "k"])
    assert any(".k_proj.lora_A" in n for n in opt.trainable_state_dict())
    with pytest.raises(ValueError, match="lora_target_modules"):
        make(folders["tiny-t5"], llm="lora", lora_target_modules=["query_key_value"])


def test_load_trainable_state_dict_round_trip_and_key_check(folders):
    source, target = make(folders["tiny-t5"], llm="lora"), make(folders["tiny-t5"], llm="lora")
    perturb(source)
    x = tokens()
    target.load_trainable_state_dict(source.trainable_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(target.ce_loss(x, CAPTIONS), source.ce_loss(x, CAPTIONS), atol=0, rtol=0)
    state = dict(source.trainable_state_dict())
    state.pop("blip.query_tokens")
    with pytest.raises(KeyError, match="query_tokens"):
        target.load_trainable_state_dict(state)


# --------------------------------------------------------------------------------------------
# Export format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_lora_adapter_is_a_peft_folder(folders, flavour, tmp_path):
    from peft import PeftModel

    model = make(folders[flavour], llm="lora")
    perturb(model)
    out = model.save_trained(tmp_path / "export")
    assert (out / LORA_DIR / "adapter_config.json").exists() and (
        out / LORA_DIR / "adapter_model.safetensors"
    ).exists()
    plain = Blip2ForConditionalGeneration.from_pretrained(folders[flavour]).language_model
    peft_lm = PeftModel.from_pretrained(plain, str(out / LORA_DIR)).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    extra = {"decoder_input_ids": ids} if flavour == "tiny-t5" else {}
    with torch.no_grad():
        ours = model.language_model(input_ids=ids, **extra).logits
        theirs = peft_lm(input_ids=ids, **extra).logits
        base = Blip2ForConditionalGeneration.from_pretrained(folders[flavour]).language_model(
            input_ids=ids, **extra
        )
    torch.testing.assert_close(theirs, ours)
    assert (base.logits - ours).abs().max() > 1e-4  # the adapter does change the LM


@pytest.mark.parametrize("flavour, llm", [("tiny-t5", "lora"), ("tiny-opt", "lora"), ("tiny-t5", "full")])
def test_save_trained_round_trip(folders, tmp_path, flavour, llm):
    model = make(folders[flavour], llm=llm, temporal_embeddings=True, fusion="mean")
    perturb(model)
    out = model.save_trained(tmp_path / "export")
    loaded = VideoCaptioner.from_trained(out, load_vision=False)
    assert dataclasses.asdict(loaded.cfg) == dataclasses.asdict(model.cfg)
    assert loaded.pretrained == folders[flavour] and (out / EXPORT_FILE).exists()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded.ce_loss(x, CAPTIONS), model.ce_loss(x, CAPTIONS), atol=0, rtol=0)
    assert set(loaded.trainable_state_dict()) == set(model.trainable_state_dict())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_merged_export_is_a_plain_blip2_folder(folders, tmp_path, flavour):
    model = make(folders[flavour], llm="lora", temporal_embeddings=True, load_vision=False)
    perturb(model)
    out = model.save_trained(tmp_path / "merged", merge_lora=True)
    assert not (out / LORA_DIR).exists()
    plain = Blip2ForConditionalGeneration.from_pretrained(out)  # opens without peft
    assert sum(p.numel() for p in plain.vision_model.parameters()) > 0
    loaded = VideoCaptioner.from_trained(out)
    assert loaded.cfg.llm == "frozen" and loaded.blip.vision_model is not None
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.ce_loss(x, CAPTIONS), model.ce_loss(x, CAPTIONS), atol=1e-5, rtol=1e-5
        )


def test_load_vision_false_keeps_no_vit(folders):
    model = make(folders["tiny-opt"], load_vision=False)
    assert model.blip.vision_model is None
    assert not any("vision_model" in n for n, _ in model.named_parameters())
    assert not any("vision_model" in n for n in model.state_dict())
    assert torch.isfinite(model.ce_loss(tokens(), CAPTIONS))  # training from the cache still works
    with pytest.raises(RuntimeError, match="load_vision=False"):
        model.encode_frames(torch.randn(1, 3, 3, 32, 32))


# --------------------------------------------------------------------------------------------
# dtype rules
# --------------------------------------------------------------------------------------------


def test_bf16_keeps_trainables_fp32_and_vit_in_eval(folders):
    model = make(folders["tiny-t5"], llm="lora", dtype="bfloat16", temporal_embeddings=True)
    assert model.compute_dtype == torch.bfloat16
    # The ViT keeps fp32 weights (bf16 only inside autocast); the Q-Former and queries are fp32.
    assert {p.dtype for p in model.blip.vision_model.parameters()} == {torch.float32}
    assert {p.dtype for p in model.blip.qformer.parameters()} == {torch.float32}
    assert model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16  # frozen base
    assert {p.dtype for p in model.trainable_state_dict().values()} == {torch.float32}  # incl. LoRA
    model.train()
    assert model.blip.qformer.training and not model.blip.vision_model.training
    loss = model(tokens().half(), CAPTIONS)  # forward = ce_loss; float16 tokens as in the cache
    loss.backward()
    assert torch.isfinite(loss) and model.blip.query_tokens.grad.dtype == torch.float32
    ids = model.generate(tokens(), num_beams=2, max_new_tokens=4, min_new_tokens=1).token_ids
    assert model(tokens(), token_ids=ids).shape == (2,)


@pytest.mark.gpu
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_cuda_defaults_to_bf16_autocast(folders, flavour):
    cfg = ModelConfig(pretrained=folders[flavour], image_size=32, num_frames=3, llm="lora")
    model = VideoCaptioner.from_pretrained(folders[flavour], cfg, device="cuda")
    assert model.compute_dtype == torch.bfloat16 and model.device.type == "cuda"
    frames = model.encode_frames(torch.randn(2, 3, 3, 32, 32, device="cuda"))
    model.ce_loss(frames.half(), CAPTIONS).backward()
    assert model.blip.qformer.layernorm.weight.grad is not None
    out = model.generate(frames, num_beams=1, max_new_tokens=5, output_logprobs=True)
    torch.testing.assert_close(
        model.sequence_logprobs(frames, out.token_ids).float(), out.logprobs, atol=0.1, rtol=0.05
    )


def test_export_of_a_relative_local_folder_loads_from_anywhere(folders, tmp_path, monkeypatch):
    base = Path(folders["tiny-t5"])
    monkeypatch.chdir(base.parent)
    model = make(base.name)  # a relative folder, as in configs/demo.yaml
    assert model.pretrained == str(base.resolve())
    out = model.save_trained(tmp_path / "export")
    monkeypatch.chdir(tmp_path)
    assert VideoCaptioner.from_trained(out, load_vision=False).pretrained == str(base.resolve())


# ---------------------------------------------------------------------------------------
# The ViT alone (pipeline/vision.py): what extract loads
# ---------------------------------------------------------------------------------------


def test_frame_encoder_loads_only_the_vit_and_encodes_like_the_full_model(folders):
    from pipeline.vision import FrameEncoder

    folder = folders["tiny-t5"]
    cfg = ModelConfig(pretrained=str(folder), num_frames=3, image_size=32)
    full = VideoCaptioner.from_pretrained(folder, cfg)
    encoder = FrameEncoder.from_pretrained(folder, cfg)
    assert set(encoder.state_dict()) == {f"vision_model.{k}" for k in full.blip.vision_model.state_dict()}
    pixels = torch.randn(2, 3, 3, 32, 32)
    assert torch.equal(encoder.encode_frames(pixels), full.encode_frames(pixels))
    assert (encoder.tokens_per_frame, encoder.vision_width) == (full.tokens_per_frame, full.vision_width)


def test_frame_encoder_reads_only_the_shards_holding_the_vit(folders, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    from pipeline.vision import INDEX_FILE, FrameEncoder, _vision_files

    blip = Blip2ForConditionalGeneration.from_pretrained(folders["tiny-t5"])
    blip.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())["weight_map"]
    files = _vision_files(tmp_path / "sharded")
    assert 0 < len(files) < len(set(index.values()))
    cfg = ModelConfig(pretrained=str(tmp_path / "sharded"), num_frames=2, image_size=32)
    encoder = FrameEncoder.from_pretrained(tmp_path / "sharded", cfg)
    for name, tensor in blip.vision_model.state_dict().items():
        assert torch.equal(encoder.vision_model.state_dict()[name], tensor), name


def test_frame_encoder_refuses_a_folder_without_safetensors(tmp_path, folders):
    import shutil

    from pipeline.vision import FrameEncoder

    shutil.copy(Path(folders["tiny-t5"]) / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        FrameEncoder.from_pretrained(tmp_path, ModelConfig(pretrained=str(tmp_path)))


def test_frame_encoder_fetches_only_vit_shards_from_the_hub(folders, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from pipeline.vision import INDEX_FILE, SINGLE_FILE, _vision_files

    blip = Blip2ForConditionalGeneration.from_pretrained(folders["tiny-t5"])
    blip.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    fetched = []

    def fake_download(repo_id, filename, **_):  # the hub, served from local folders
        path = tmp_path / repo_id.split("/")[-1] / filename
        if not path.exists():
            raise LocalEntryNotFoundError(f"{repo_id}/{filename}")
        fetched.append(filename)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    files = _vision_files("org/sharded")
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())["weight_map"]
    vit_shards = {f for k, f in index.items() if k.startswith("vision_model.")}
    assert {p.name for p in files} == vit_shards and fetched == [INDEX_FILE, *sorted(vit_shards)]
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / SINGLE_FILE).write_bytes((Path(folders["tiny-t5"]) / SINGLE_FILE).read_bytes())
    assert _vision_files("org/single") == [tmp_path / "single" / SINGLE_FILE]  # no index: one file
    with pytest.raises(LocalEntryNotFoundError, match=INDEX_FILE):  # offline, nothing cached: says so
        _vision_files("org/absent")


# --------------------------------------------------------------------------------------------
# Frame size: the checkpoint's own by default; larger frames interpolate positions as LAVIS does
# --------------------------------------------------------------------------------------------


def _lavis_interpolated(vit, new_grid):
    """LAVIS's `interpolate_pos_embed`: the patch grid's position embeddings resized bicubically
    (align_corners=False) to `new_grid` x `new_grid`, the CLS position kept."""
    pos = vit.embeddings.position_embedding.detach()  # (1, 1 + g*g, D)
    grid, width = int((pos.shape[1] - 1) ** 0.5), pos.shape[2]
    patches = pos[:, 1:].reshape(1, grid, grid, width).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(
        patches, size=(new_grid, new_grid), mode="bicubic", align_corners=False
    )
    return torch.cat([pos[:, :1], resized.permute(0, 2, 3, 1).reshape(1, -1, width)], dim=1)


def test_a_224px_vit_runs_at_364px_with_lavis_interpolated_positions(tmp_path):
    """EVA ViT-g's geometry (patch 14, 224 px -> 16x16 grid) at 364 px (26x26 grid, 677 tokens):
    vidcap's tokens equal those of the same ViT holding LAVIS-interpolated position embeddings
    and run natively at 364 px."""
    import copy

    from transformers import Blip2Config, Blip2VisionConfig, Blip2VisionModel

    from pipeline.vision import FrameEncoder

    torch.manual_seed(0)
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                               patch_size=14, image_size=224, initializer_range=0.02)  # fmt: skip
    vit = Blip2VisionModel(vision).eval()
    with torch.no_grad():  # position embeddings with structure, so the interpolation matters
        vit.embeddings.position_embedding.normal_(0.0, 1.0)
    config = Blip2Config(vision_config=vision.to_dict())
    encoder = FrameEncoder(vit, config, ModelConfig(pretrained="-", image_size=364), "cpu")
    assert encoder.tokens_per_frame == 26 * 26 + 1 == 677
    pixels = torch.randn(1, 2, 3, 364, 364)
    ours = encoder.encode_frames(pixels)  # (1, 2, 677, 32)

    native = Blip2VisionModel(Blip2VisionConfig(**{**vision.to_dict(), "image_size": 364})).eval()
    state = copy.deepcopy(vit.state_dict())
    state["embeddings.position_embedding"] = _lavis_interpolated(vit, 26)
    native.load_state_dict(state)
    with torch.no_grad():
        expected = native(pixel_values=pixels[0]).last_hidden_state
        at_224 = encoder.encode_frames(torch.randn(1, 1, 3, 224, 224))
    assert ours.shape == (1, 2, 677, 32) and at_224.shape == (1, 1, 257, 32)
    torch.testing.assert_close(ours[0], expected, atol=1e-5, rtol=1e-5)


def test_image_size_defaults_to_the_checkpoint_own(folders, tmp_path):
    from pipeline.vision import FrameEncoder, frame_size

    folder = folders["tiny-t5"]
    default = ModelConfig(pretrained=folder, num_frames=2)
    assert default.image_size == 0 and frame_size(default) == 32  # the tiny ViT's training size
    model = VideoCaptioner.from_pretrained(folder, default)
    assert model.image_size == 32 and model.tokens_per_frame == 17
    assert FrameEncoder.from_pretrained(folder, default).image_size == 32
    bigger = VideoCaptioner.from_pretrained(
        folder, ModelConfig(pretrained=folder, num_frames=2, image_size=48)
    )
    assert bigger.image_size == 48 and bigger.tokens_per_frame == 37  # 6x6 patches + CLS, interpolated
    assert bigger.encode_frames(torch.randn(1, 2, 3, 48, 48)).shape == (1, 2, 37, 32)
    # An export records the size it was trained at, not "the checkpoint's".
    meta = json.loads((model.save_trained(tmp_path / "export") / EXPORT_FILE).read_text())
    assert meta["model"]["image_size"] == 32
    with pytest.raises(Exception, match="image_size"):
        ModelConfig(image_size=-1)


def test_frame_size_is_part_of_the_cache_fingerprint(folders):
    from pipeline.config import config_from_dict
    from stages.extract import describe_vit, extract_fingerprint

    def fingerprint(size):
        config = config_from_dict(
            {"run": {"device": "cpu"}, "model": {"pretrained": folders["tiny-t5"], "image_size": size}}
        )
        return extract_fingerprint(config, describe_vit(config))

    assert fingerprint(0) == fingerprint(32)  # the default resolves to the checkpoint's 32 px
    bigger = fingerprint(48)
    assert (bigger["image_size"], bigger["tokens_per_frame"]) == (48, 37) and bigger != fingerprint(32)


# --------------------------------------------------------------------------------------------
# A trained ViT (`model.vit: full`, the paper's "all modules trainable")
# --------------------------------------------------------------------------------------------


def test_a_trained_vit_needs_frames_not_the_cache():
    from pipeline.config import ConfigError, config_from_dict

    with pytest.raises(
        ConfigError, match=r"model.vit: full .* train.source: cache .* set train.source: video"
    ):
        config_from_dict({"model": {"vit": "full"}})
    with pytest.raises(ConfigError, match="eval.source: video"):
        config_from_dict(
            {"model": {"vit": "full"}, "train": {"source": "video"}, "eval": {"source": "cache"}}
        )
    config = config_from_dict({"model": {"vit": "full"}, "train": {"source": "video"}})
    assert config.eval.source == "auto"  # eval's `auto` takes the videos for such a model
    with pytest.raises(ConfigError, match="model.vit"):
        ModelConfig(vit="half")


def test_full_vit_trains_with_checkpointing_its_own_lr_and_is_exported(folders, tmp_path):
    from pipeline.optim import LoopSettings, build_optimizer

    model = make(folders["tiny-t5"], vit="full", vit_lr_scale=0.1)
    vit = model.blip.vision_model
    assert all(p.requires_grad for p in vit.parameters()) and vit.is_gradient_checkpointing
    assert {n for n in model.trainable_state_dict() if "vision_model" in n} == _names(
        vit, "blip.vision_model"
    )
    pixels = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert not model.encode_frames(pixels).requires_grad  # eval mode: no gradient, as for captioning
    model.train()
    assert vit.training  # (checkpointing runs in train mode only)
    model.ce_loss(model.encode_frames(pixels), CAPTIONS).backward()
    assert vit.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    settings = LoopSettings(epochs=1, batch_size=2, lr=1e-3, min_lr=0.0, warmup_steps=0, weight_decay=0.05,
                            grad_clip=0.0, checkpoint_every=1, log_every=1, seed=0)  # fmt: skip
    optimizer, _ = build_optimizer(model, settings, total_steps=4)
    vit_ids = {id(p) for p in vit.parameters()}
    for group in optimizer.param_groups:
        in_vit = {id(p) in vit_ids for p in group["params"]}
        assert len(in_vit) == 1 and group["lr"] == pytest.approx(1e-4 if in_vit == {True} else 1e-3)
    assert any(g["weight_decay"] > 0 and id(g["params"][0]) in vit_ids for g in optimizer.param_groups)

    perturb(model)  # every trainable tensor, the ViT's included
    model.eval()
    with torch.no_grad():
        expected = model.ce_loss(model.encode_frames(pixels), CAPTIONS)
    again = VideoCaptioner.from_trained(model.save_trained(tmp_path / "export"))
    torch.testing.assert_close(
        again.blip.vision_model.embeddings.patch_embedding.weight, vit.embeddings.patch_embedding.weight
    )
    with torch.no_grad():
        torch.testing.assert_close(again.ce_loss(again.encode_frames(pixels), CAPTIONS), expected)
    with pytest.raises(ValueError, match="reads frames, not cached tokens"):
        VideoCaptioner.from_trained(tmp_path / "export", load_vision=False)
