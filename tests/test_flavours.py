"""Language-model flavours (`pipeline.model.FLAVOURS`) behave as BLIP-2/LAVIS drive each LM:
OPT ends captions with a newline and stops generating there, the seed's minimum length per
flavour, the seed prompts, and the ViT precision rule recorded in the cache fingerprint."""

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.demo.testmodels import NEWLINE, init_model
from pipeline.model import FLAVOURS, VideoCaptioner, flavour_of

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flavour_models")
    return {p: str(init_model(root / p, p, seed=1)) for p in ("tiny-t5", "tiny-opt")}


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
@pytest.mark.parametrize(("preset", "expected"), [("tiny-t5", 4), ("tiny-opt", 5)])
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
