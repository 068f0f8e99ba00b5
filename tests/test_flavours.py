"""Language-model flavours (`pipeline.model.FLAVOURS`) behave as BLIP-2/LAVIS drive each LM:
OPT ends captions with a newline and stops generating there, the seed's minimum length per
flavour, the seed prompts; InstructBLIP (Vicuna/LLaMA) loads and trains like BLIP-2, and a
feature cache is shared by every checkpoint with the same ViT."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, InstructBlipForConditionalGeneration

from pipeline.config import ModelConfig, config_from_dict
from pipeline.demo.testmodels import IMAGE_TOKEN, NEWLINE, init_model
from pipeline.model import FLAVOURS, VideoCaptioner, flavour_of

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flavour_models")
    return {p: str(init_model(root / p, p, seed=1)) for p in ("tiny-t5", "tiny-opt", "tiny-instructblip")}


def make(folder, **settings) -> VideoCaptioner:
    cfg = ModelConfig(pretrained=folder, image_size=32, **{"num_frames": 2, **settings})
    return VideoCaptioner.from_pretrained(folder, cfg)


def tokens(b=2, t=2, seed=0):
    return torch.randn(b, t, 17, 32, generator=torch.Generator().manual_seed(seed))  # (B, T, L, D)


class favour:
    """Make token `token_id` the most likely one at every step of the LM (a forward hook)."""

    def __init__(self, model, token_id):
        self.model, self.token_id = model, token_id

    def __enter__(self):
        head = self.model.language_model.get_output_embeddings()
        self.handle = head.register_forward_hook(self._hook)

    def _hook(self, module, args, logits):
        logits[..., self.token_id] += 100.0
        return logits

    def __exit__(self, *exc):
        self.handle.remove()


def test_flavour_table_holds_the_seed_rules():
    assert flavour_of("opt").terminator == "\n" and flavour_of("opt").seed_prompt == ""
    assert flavour_of("t5").terminator is None and flavour_of("t5").seed_prompt == "a video of"
    # LAVIS min_length=5: for T5 it counts the decoder start token, for decoder-only LMs it does not.
    assert {name: f.seed_min_new_tokens for name, f in FLAVOURS.items()} == {"t5": 4, "opt": 5, "llama": 5}
    assert flavour_of("llama").lora_names["q"] == "q_proj" and flavour_of("llama").lora_names["o"] == "o_proj"
    with pytest.raises(ValueError, match="gpt2"):
        flavour_of("gpt2")


def test_seed_prompts_are_the_default(folders):
    assert make(folders["tiny-t5"]).prompt == "a video of"
    opt = make(folders["tiny-opt"])
    assert opt.prompt == "" and opt.prompt_ids.tolist() == [opt.tokenizer.bos_token_id]  # "</s>" only
    assert make(folders["tiny-opt"], prompt="a video of").prompt == "a video of"


def test_opt_targets_end_with_the_newline_not_eos(folders):
    model = make(folders["tiny-opt"])
    newline = model.tokenizer.convert_tokens_to_ids(NEWLINE)
    assert model.eos_token_id == newline != model.tokenizer.eos_token_id
    ids, mask = model._tokenize_captions(["a man is walking", "a dog"])
    ends = ids[torch.arange(2), mask.sum(1) - 1]
    assert ends.tolist() == [newline, newline] and model.tokenizer.eos_token_id not in ids[mask].tolist()
    t5 = make(folders["tiny-t5"])
    ids, mask = t5._tokenize_captions(["a man is walking"])
    assert ids[0, -1].item() == t5.tokenizer.eos_token_id == t5.eos_token_id


@torch.no_grad()
def test_opt_zero_shot_generation_stops_at_the_newline(folders):
    model = make(folders["tiny-opt"])
    newline, eos = model.eos_token_id, model.tokenizer.eos_token_id
    for beams in (1, 3):
        with favour(model, newline):  # stops right after the seed's minimum of 5 new tokens
            out = model.generate(tokens(), num_beams=beams, max_new_tokens=12)
        assert out.token_ids.shape[1] == 6 and (out.token_ids[:, 5] == newline).all()
        assert (out.token_ids[:, :5] != newline).all() and all("\n" not in t for t in out.texts)
        with favour(model, eos):  # `</s>` is no stop token for BLIP-2's OPT: runs to the limit
            out = model.generate(tokens(), num_beams=beams, max_new_tokens=7, min_new_tokens=0)
        assert out.token_ids.shape[1] == 7 and (out.token_ids == eos).all()


@torch.no_grad()
@pytest.mark.parametrize(("preset", "expected"), [("tiny-t5", 4), ("tiny-opt", 5), ("tiny-instructblip", 5)])
def test_minimum_length_defaults_to_the_seed_rule(folders, preset, expected):
    model = make(folders[preset])
    with favour(model, model.eos_token_id):
        out = model.generate(tokens(), num_beams=2, max_new_tokens=10)  # min_new_tokens unset
        explicit = model.generate(tokens(), num_beams=2, max_new_tokens=10, min_new_tokens=2)
    assert (out.token_ids[:, expected] == model.eos_token_id).all()
    assert (out.token_ids[:, :expected] != model.eos_token_id).all()
    assert (explicit.token_ids[:, 2] == model.eos_token_id).all()
    # Sequence log-probs apply the same rule when told "unset", as SCST passes it through.
    ids = out.token_ids
    torch.testing.assert_close(
        model.sequence_logprobs(tokens(), ids, min_new_tokens=None),
        model.sequence_logprobs(tokens(), ids, min_new_tokens=expected),
    )


# --------------------------------------------------------------------------------------------
# InstructBLIP (LLaMA-style LM)
# --------------------------------------------------------------------------------------------


def _instructblip_loss(folder, pixels, prompt, captions):
    """transformers' own InstructBLIP forward: `<image>` x Q + `<s>` prompt caption `</s>`, and
    the Q-Former reading the prompt through its BERT tokenizer (it always does)."""
    hf = InstructBlipForConditionalGeneration.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    qtok = AutoTokenizer.from_pretrained(folder, subfolder="qformer_tokenizer")
    image = [tok.convert_tokens_to_ids(IMAGE_TOKEN)] * hf.config.num_query_tokens
    rows = [image + tok(prompt).input_ids + tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id]
            for c in captions]  # fmt: skip
    width, prefix = max(map(len, rows)), len(image + tok(prompt).input_ids)
    with torch.no_grad():
        return hf(
            pixel_values=pixels,
            input_ids=torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows]),
            attention_mask=torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            labels=torch.tensor([[-100] * prefix + r[prefix:] + [-100] * (width - len(r)) for r in rows]),
            qformer_input_ids=torch.tensor([qtok(prompt).input_ids] * len(captions)),
        ).loss


def test_instructblip_loss_equals_transformers_forward_with_qformer_text(folders):
    folder, captions = folders["tiny-instructblip"], ["a man is walking", "a dog runs"]
    model = make(folder, num_frames=1, prompt="a video of", qformer_text_input=True)
    assert model.flavour.name == "llama" and model.decoder_only and model.eos_token_id == 2
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.ce_loss(model.encode_frames(pixels[:, None]), captions)
    theirs = _instructblip_loss(folder, pixels, "a video of", captions)
    assert 2.0 < theirs.item() < 10.0
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_instructblip_qformer_reads_the_prompt_only_when_asked(folders):
    folder = folders["tiny-instructblip"]
    plain, reading = make(folder), make(folder, prompt="a video of", qformer_text_input=True)
    assert plain.qformer_prompt_ids is None and reading.qformer_prompt_ids[0].item() == 2  # [CLS]
    x = tokens()
    assert plain.query_outputs(x).shape == reading.query_outputs(x).shape == (2, 8, 64)
    assert not torch.allclose(plain.query_outputs(x), reading.query_outputs(x))
    with pytest.raises(ValueError, match="InstructBLIP"):
        make(folders["tiny-t5"], qformer_text_input=True)


def test_instructblip_lora_targets_q_proj_v_proj_and_exports(folders, tmp_path):
    model = make(folders["tiny-instructblip"], llm="lora")  # default targets `q`, `v`
    lora = [n for n in model.trainable_state_dict() if ".lora_" in n]
    assert len(lora) == 2 * 2 * 2 and {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {
        "q_proj",
        "v_proj",
    }
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    x, captions = tokens(), ["a man is walking", "a dog runs"]
    with torch.no_grad():
        expected = model.ce_loss(x, captions)
    for merge in (False, True):
        out = model.save_trained(tmp_path / f"export{merge}", merge_lora=merge)
        again = VideoCaptioner.from_trained(out)
        with torch.no_grad():
            torch.testing.assert_close(again.ce_loss(x, captions), expected, atol=1e-5, rtol=1e-5)
    merged = json.loads((tmp_path / "exportTrue/config.json").read_text())
    assert merged["model_type"] == "instructblip"  # a plain InstructBLIP folder


def test_a_cache_is_shared_by_checkpoints_with_the_same_vit(folders, tmp_path):
    """The cache fingerprint hashes the ViT's weights, not the checkpoint: a BLIP-2 T5 and an
    InstructBLIP holding the same vision tower describe the same cache; another ViT does not."""
    from stages.extract import describe_vit, extract_fingerprint

    donor = InstructBlipForConditionalGeneration.from_pretrained(folders["tiny-instructblip"])
    t5_vit = VideoCaptioner.from_pretrained(
        folders["tiny-t5"], ModelConfig(pretrained=folders["tiny-t5"])
    ).blip
    donor.vision_model.load_state_dict(t5_vit.vision_model.state_dict())
    shared = tmp_path / "instructblip-with-t5-vit"
    donor.save_pretrained(shared)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (shared / name).write_bytes((Path(folders["tiny-instructblip"]) / name).read_bytes())

    def fingerprint(folder):
        config = config_from_dict(
            {
                "run": {"device": "cpu"},
                "model": {"pretrained": str(folder), "num_frames": 2, "image_size": 32},
            }
        )
        return extract_fingerprint(config, describe_vit(config))

    assert fingerprint(folders["tiny-t5"]) == fingerprint(shared)
    other = init_model(tmp_path / "other", "tiny-instructblip", seed=2)  # its own random ViT
    assert fingerprint(folders["tiny-t5"])["vit_weights_sha256"] != fingerprint(other)["vit_weights_sha256"]


# --------------------------------------------------------------------------------------------
# Every stage, end to end, for the decoder-only flavours
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-instructblip"])
def test_extract_train_scst_eval_caption_run_end_to_end(tiny_world, tmp_path, preset):
    from pipeline.demo.tinyworld import tiny_config
    from run_pipeline import run_pipeline

    model = init_model(tmp_path / preset, preset, vocab_from=tiny_world["annotations"], seed=0)
    config = tiny_config(
        tiny_world,
        tmp_path / "run",
        run={"stages": ["extract", "train", "scst", "eval", "caption"]},
        model={"pretrained": str(model), "llm": "lora"},
        cache={"path": str(tmp_path / "features.zarr")},
        train={"epochs": 1},
        scst={"max_steps": 2, "batch_size": 4, "samples": 2, "checkpoint_every": 1},
        eval={"num_beams": 2, "metrics": ["Bleu", "CIDEr"], "min_new_tokens": None},
        caption={"inputs": [tiny_world["videos"]], "num_beams": 1, "max_new_tokens": 6},
    )
    result = run_pipeline(config)
    assert all(info["status"] == "ran" for info in result["stages"].values()), result["stages"]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert {"zero_shot", "ce", "scst"} <= set(summary["metrics"])
    records = (tmp_path / "run/caption/captions.jsonl").read_text().splitlines()
    assert records and all("caption" in json.loads(r) for r in records)
    predictions = json.loads(next((tmp_path / "run/eval").rglob("predictions*.json")).read_text())
    assert predictions and not any("\n" in str(c) for c in json.dumps(predictions).split('"'))


# --------------------------------------------------------------------------------------------
# Presets of the seed's configs
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("preset", "seed"),
    [
        # pretrained, prompt, frames, llm, epochs, global batch (per GPU x 8), lr, min_lr
        ("msrvtt_vicuna7b_ce", ("Salesforce/instructblip-vicuna-7b", "", 8, "frozen", 20, 16 * 8, 1e-5, 0.0)),
        ("msrvtt_opt67b_ce", ("Salesforce/blip2-opt-6.7b", "", 8, "frozen", 30, 64 * 8, 1e-6, 0.0)),
    ],
)
def test_presets_hold_the_seed_configs_values(preset, seed):
    from pipeline.config import load_config

    config = load_config(ROOT / f"configs/{preset}.yaml")
    m, t = config.model, config.train
    assert (m.pretrained, m.prompt, m.num_frames, m.llm, t.epochs, t.batch_size, t.lr, t.min_lr) == seed
    assert (t.warmup_steps, t.weight_decay, t.captions, config.run.seed) == (1000, 0.05, "all", 42)
    assert not m.qformer_text_input and config.eval.min_new_tokens is None  # the flavour's seed rule
    assert (config.eval.num_beams, config.eval.max_new_tokens, m.max_caption_tokens) == (5, 32, 32)


def test_364px_preset_has_its_own_cache():
    from pipeline.config import load_config

    base, big = (
        load_config(ROOT / f"configs/{name}.yaml") for name in ("msrvtt_t5xl_ce", "msrvtt_t5xl_ce_364px")
    )
    assert (base.model.image_size, big.model.image_size) == (224, 364)
    assert base.cache_path != big.cache_path and base.output_dir != big.output_dir
