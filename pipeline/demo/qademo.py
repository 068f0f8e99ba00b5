"""Question answering in the demo: the captioning demo's world and tiny model, taught the questions' words.

The tiny models' word-level tokenizers know only the words of the captions they were built from
(a real T5 or OPT tokenizer knows every English word). `add_words` writes a copy of a tiny model
whose tokenizer also knows the questions' words: the embeddings of the known words are moved to
their new ids, new words get fresh random rows, and everything else, the ViT above all, is the
same tensors. The ViT's weights hash is therefore the same, and the captioning demo's feature
cache serves the QA demo as it is (`configs/demo_qa.yaml` points `cache.path` at it).

`per_question_accuracy` splits a QA eval's predictions by the synthetic world's questions
(colour, shape, direction, end side, corners), which is what the README's miniature table shows.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, Blip2ForConditionalGeneration

from pipeline.config import Config
from pipeline.demo.synth import question_fact, write_world_qa
from pipeline.demo.testmodels import IMAGE_TOKEN, _words_from, build_tokenizer
from pipeline.qa import is_correct

QA_SUFFIX = "-qa"
"""The QA demo's model folder is the captioning model's folder name plus this suffix."""
PROMPT_WORDS = ("question", "short", "answer", ":", "?")
"""The words of `qa.prompt` and the question mark, which the tiny vocabularies lack."""
COMPLETE = "qa_words.json"
"""Written last into a model folder by `add_words`: the copy is complete."""


def add_words(base_dir: str | Path, out_dir: str | Path, vocab_from: str | Path, seed: int = 0) -> Path:
    """A copy of the tiny BLIP-2 in `base_dir` whose tokenizer also knows the words of `vocab_from`."""
    base, out = Path(base_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    blip = Blip2ForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32)
    flavour = "opt" if blip.config.use_decoder_only_language_model else "t5"
    old = tokenizer.get_vocab()  # word -> id
    words = [w for w in old if w not in tokenizer.all_special_tokens and w != IMAGE_TOKEN]
    new_tokenizer = build_tokenizer(flavour, words + _words_from(vocab_from) + list(PROMPT_WORDS))
    new = new_tokenizer.get_vocab()
    size = -(-len(new) // 8) * 8  # as `init_model`: a multiple of 8
    lm = blip.language_model
    tables = [lm.get_input_embeddings().weight.detach().clone()]
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    if not tied:
        tables.append(lm.get_output_embeddings().weight.detach().clone())
    lm.resize_token_embeddings(size)
    blip.config.text_config.vocab_size = size
    generator = torch.Generator().manual_seed(seed)
    moved = [(new[w], i) for w, i in old.items() if w in new]
    targets = [lm.get_input_embeddings().weight] + ([] if tied else [lm.get_output_embeddings().weight])
    with torch.no_grad():
        for table, target in zip(tables, targets, strict=True):
            fresh = torch.randn(size, table.shape[1], generator=generator) * table.std()
            fresh[[n for n, _ in moved]] = table[[o for _, o in moved]]
            target.copy_(fresh)
    blip.config.image_token_index = new[IMAGE_TOKEN]
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out)  # image processor and the pretraining record come along
    blip.save_pretrained(str(out))
    new_tokenizer.save_pretrained(str(out))
    added = sorted(set(new) - set(old))
    (out / COMPLETE).write_text(
        json.dumps({"base": str(base.resolve()), "added_words": added}, indent=1) + "\n"
    )
    return out


def caption_demo_config(config: Config) -> Config:
    """The captioning demo a QA demo config builds on: its world's ``annotations.jsonl`` and the
    model folder without `QA_SUFFIX`."""
    model_dir = Path(config.model.pretrained)
    if not model_dir.name.endswith(QA_SUFFIX):
        raise ValueError(f"the QA demo's model folder must end in {QA_SUFFIX!r}: {model_dir}")
    base = model_dir.with_name(model_dir.name[: -len(QA_SUFFIX)])
    world = Path(config.data.annotations).parent
    data = dataclasses.replace(config.data, task="caption", annotations=str(world / "annotations.jsonl"))
    model = dataclasses.replace(config.model, pretrained=str(base))
    return dataclasses.replace(config, data=data, model=model)


def prepare_qa_demo(config: Config) -> None:
    """After the captioning demo's world and model exist: the questions, and the model that knows their words."""
    world = Path(config.data.annotations).parent
    if not Path(config.data.annotations).exists():
        write_world_qa(world)
    model_dir = Path(config.model.pretrained)
    if not (model_dir / COMPLETE).exists():
        base = caption_demo_config(config).model.pretrained
        add_words(base, model_dir, config.data.annotations, seed=config.run.seed)


def per_question_accuracy(predictions: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy (0..1) per fact asked for, from a QA eval's ``predictions.json`` rows."""
    right: dict[str, list[bool]] = {}
    for row in predictions:
        right.setdefault(question_fact(row["question"]), []).append(
            is_correct(row["prediction"], [row["answer"]])
        )
    return {fact: sum(hits) / len(hits) for fact, hits in right.items()}
