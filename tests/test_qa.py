"""Video question answering: LAVIS QA files and our JSONL, answer normalisation and accuracy, prompts per
example in both LM flavours, the QA SCST reward, cache reuse from captioning, and a tiny QA run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.annotations import read_annotations
from pipeline.config import DataConfig, ModelConfig, config_from_dict, load_config, stage_fingerprint
from pipeline.demo.qademo import add_words, caption_demo_config, per_question_accuracy
from pipeline.demo.synth import make_synthetic_world
from pipeline.demo.testmodels import init_model
from pipeline.demo.tinyworld import tiny_config
from pipeline.errors import AnnotationError, ConfigError
from pipeline.model import VideoCaptioner
from pipeline.plan import plan_config
from pipeline.qa import (
    ExactMatchReward,
    QaItem,
    QaPlan,
    format_qa_table,
    is_correct,
    load_qa,
    normalize_answer,
    qa_accuracy,
    qa_prompt,
    question_type,
)
from stages import eval as eval_stage
from stages import extract, scst, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def write_lavis_qa(folder: Path, labels_name: str = "train_ans2label.json") -> dict[str, int]:
    """MSRVTT-QA as LAVIS distributes it: qa_{train,val,test}.json rows + the training answer labels,
    beside the caption files of the same videos (one annotations/ folder). Returns questions per split."""
    folder.mkdir(parents=True)
    videos = {
        "train": ["video0", "video1", "video2"],
        "val": ["video6513"],
        "test": ["video7010", "video7011"],
    }
    questions = ["what is a man doing?", "who is talking?", "how many people are there?", "where is he?"]
    answers = ["dance", "man", "two", "kitchen"]
    counts, qid = {}, 0
    for split, ids in videos.items():
        rows = []
        for v in ids:
            for q, a in zip(questions, answers, strict=True):
                rows.append({"video": f"{v}.mp4", "question": q, "answer": a, "question_id": qid})
                qid += 1
        if split == "test":
            rows.append(
                {
                    "video": "video7011.mp4",
                    "question": "when does it rain?",
                    "answer": "night",
                    "question_id": qid,
                }
            )
        (folder / f"qa_{split}.json").write_text(json.dumps(rows))
        counts[split] = len(rows)
        caps = [{"video": f"{v}.mp4", "caption": "a man dances", "image_id": v} for v in ids]
        (folder / f"cap_{split}.json").write_text(json.dumps(caps))
    (folder / labels_name).write_text(json.dumps({a: i for i, a in enumerate(answers)}))
    return counts


def test_lavis_qa_files_load_with_the_right_counts(tmp_path):
    counts = write_lavis_qa(tmp_path / "annotations")
    qa = load_qa(
        DataConfig(
            format="lavis", annotations=str(tmp_path / "annotations"), video_root="/data/videos", task="qa"
        )
    )
    assert {s: len(qa.split(s)) for s in qa.splits()} == counts == {"train": 12, "val": 4, "test": 9}
    assert [r.video_id for r in qa.records("test")] == ["video7010", "video7011"]
    assert qa.videos["video7010"] == "/data/videos/video7010.mp4"
    first = qa.split("train")[0]
    assert (first.video_id, first.question, first.answer, first.question_id) == (
        "video0",
        "what is a man doing?",
        "dance",
        "0",
    )
    assert qa.answer_labels == {"dance": 0, "man": 1, "two": 2, "kitchen": 3}
    assert qa.out_of_vocabulary("test") == pytest.approx(1 / 9)  # "night" is no training answer
    # The same folder read as captions: what `extract` lists, so both tasks share one cache.
    captions = read_annotations("lavis", tmp_path / "annotations", video_root="/data/videos")
    assert {r.video_id for r in captions} == set(qa.videos)


def test_lavis_stored_answer_labels_name_and_max_videos(tmp_path):
    write_lavis_qa(tmp_path / "a", labels_name="qa_ans2label.json")  # the name LAVIS stores it under
    qa = load_qa(DataConfig(format="msvd", annotations=str(tmp_path / "a"), max_videos=1, task="qa"))
    assert qa.answer_labels is not None and len(qa.answer_labels) == 4
    assert {len(qa.split(s)) for s in ("train", "val", "test")} == {4}  # first video of each split


def test_jsonl_manifest_holds_captions_and_questions(tmp_path):
    rows = [
        {"video_id": "v1", "video": "v1.mp4", "split": "train", "captions": ["a red square"],
         "qa": [{"question": "what colour?", "answer": "red"}, {"question": "how many?", "answers": ["one", "1"]}]},
        {"video_id": "v2", "split": "test", "captions": ["a blue circle"], "qa": [{"question": "what?", "answer": "blue"}]},
    ]  # fmt: skip
    path = tmp_path / "both.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    captions = read_annotations("jsonl", path)
    assert [r.captions for r in captions] == [("a red square",), ("a blue circle",)]
    qa = load_qa(DataConfig(annotations=str(path), task="qa"))
    assert [i.question_id for i in qa.split("train")] == ["v1_0", "v1_1"]
    assert qa.split("train")[1].answers == ("one", "1")
    assert qa.videos["v2"] == str(tmp_path / "v2.mp4")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"video": "v.mp4", "question": "what?"}, "row 0: 'answer' must be"),
        ({"video": "v.mp4", "answer": "x"}, "row 0: 'question' must be"),
        ({"video": 3, "question": "q", "answer": "x"}, "row 0: 'video' must be"),
    ],
)
def test_malformed_lavis_rows_name_file_and_row(tmp_path, row, message):
    (tmp_path / "qa_train.json").write_text(json.dumps([row]))
    with pytest.raises(AnnotationError, match=message) as e:
        load_qa(DataConfig(format="lavis", annotations=str(tmp_path), task="qa"))
    assert "qa_train.json" in str(e.value)


def test_duplicate_question_ids_and_formats_without_questions_are_refused(tmp_path):
    row = {"video": "v.mp4", "question": "q", "answer": "a", "question_id": 7}
    (tmp_path / "qa_train.json").write_text(json.dumps([row, row]))
    with pytest.raises(AnnotationError, match="question_id '7' appears 2 times"):
        load_qa(DataConfig(format="lavis", annotations=str(tmp_path), task="qa"))
    with pytest.raises(AnnotationError, match="reads data.format jsonl or lavis"):
        load_qa(DataConfig(format="vatex", annotations=str(tmp_path), task="qa"))


# --------------------------------------------------------------------------------------------
# Normalisation, question types, accuracy, the SCST reward, the table
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("A Man", "man"),
        ("t-shirt", "t shirt"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("don't", "dont"),
        ("none", "0"),
        ("  an   apple!  ", "apple"),
        ("ten", "10"),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


@pytest.mark.parametrize(
    "question, kind",
    [("What is he doing?", "what"), ("who talks", "who"), ("How many dogs?", "how"), ("when does it rain", "when"),
     ("Where is it?", "where"), ("which way does it move?", "other"), ("is it red?", "other"), ("", "other")],
)  # fmt: skip
def test_question_type_is_the_first_word(question, kind):
    assert question_type(question) == kind


def test_accuracy_overall_per_type_and_unanswered():
    items = [
        QaItem("v1", "what is it?", ("dog",), "1"),
        QaItem("v1", "how many?", ("two",), "2"),
        QaItem("v2", "who is it?", ("man",), "3"),
        QaItem("v2", "what colour?", ("red", "pink"), "4"),
    ]
    predictions = {"1": "a dog", "2": "2", "4": "Pink."}  # 3 unanswered
    scores = qa_accuracy(items, predictions)
    assert scores["accuracy"] == 0.75 and scores["num_questions"] == 4 and scores["unanswered"] == 1
    assert scores["by_type"] == {
        "what": {"accuracy": 1.0, "num_questions": 2},
        "how": {"accuracy": 1.0, "num_questions": 1},
        "who": {"accuracy": 0.0, "num_questions": 1},
    }
    assert not is_correct("dogs", ["dog"])  # exact match: no lemmatisation


def test_exact_match_reward_keys_on_the_answers():
    reward = ExactMatchReward().score_candidates(["two", "dog", "dog"], ["2", "the dog", "cat"])
    assert reward.tolist() == [1.0, 1.0, 0.0]


def test_table_shows_types_and_the_papers_numbers():
    ours = {
        "ce": {
            "accuracy": 0.25,
            "num_questions": 8,
            "by_type": {"what": {"accuracy": 0.5, "num_questions": 4}},
        }
    }
    table = format_qa_table(ours, "msrvtt", "test")
    assert "MSRVTT-QA test" in table and "23.9" in table and "24.1" in table and "16.5" in table
    assert "38.8" not in table  # MSVD-QA's numbers are not MSRVTT-QA's
    line = next(row for row in table.splitlines() if row.startswith("ce"))
    assert line.split()[1:3] == ["25.0", "50.0"] and line.split()[-1] == "8"
    assert "41.0" in format_qa_table(ours, "msvd")


def test_plan_prompts_each_question_and_targets_its_answer():
    items = [QaItem("v1", "What colour?", ("Red",), "1"), QaItem("v1", "how many?", ("two",), "2"),
             QaItem("v2", "what shape?", ("circle",), "3")]  # fmt: skip
    everything = QaPlan(items, "Question: {} Short answer:", seed=0, captions="all", global_batch=2)
    examples = everything.epoch(0)
    assert everything.steps_per_epoch == 2 and len(examples) == 4  # 3 questions, wrapped to whole batches
    assert {(e.prompt, e.caption) for e in examples} == {
        ("Question: what colour? Short answer:", "red"),
        ("Question: how many? Short answer:", "two"),
        ("Question: what shape? Short answer:", "circle"),
    }
    sampled = QaPlan(items, "{}", seed=0, captions="sample", global_batch=2)
    assert sampled.examples_per_epoch == 2 and sorted(e.video_id for e in sampled.epoch(0)) == ["v1", "v2"]
    assert qa_prompt("Q: {} A:", "Is (it) red?") == "Q: is it red? A:"


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_task_and_qa_section_are_validated_and_caption_fingerprints_ignore_qa():
    with pytest.raises(ConfigError, match="data.task must be one of caption, qa"):
        config_from_dict({"data": {"task": "vqa"}})
    with pytest.raises(ConfigError, match="qa.prompt must contain"):
        config_from_dict({"qa": {"prompt": "Question:"}})
    caption = config_from_dict({})
    assert stage_fingerprint(caption, "train") == stage_fingerprint(
        config_from_dict({"qa": {"num_beams": 3}}), "train"
    )
    qa = config_from_dict({"data": {"task": "qa"}})
    assert stage_fingerprint(qa, "train") != stage_fingerprint(caption, "train")
    assert stage_fingerprint(qa, "eval") != stage_fingerprint(
        config_from_dict({"data": {"task": "qa"}, "qa": {"num_beams": 3}}), "eval"
    )
    assert (qa.qa.num_beams, qa.qa.max_new_tokens, qa.qa.prompt) == (5, 10, "Question: {} Short answer:")


# --------------------------------------------------------------------------------------------
# Prompts per example in the model (both LM flavours)
# --------------------------------------------------------------------------------------------

PROMPTS = ["question what colour is the object ? short answer", "a video of"]


@pytest.mark.parametrize("flavour", ["tiny-t5", "tiny-opt"])
def test_per_example_prompts_are_padded_without_changing_any_example(tiny_models, flavour):

    cfg = ModelConfig(pretrained=tiny_models[flavour], num_frames=2, image_size=32)
    model = VideoCaptioner.from_pretrained(tiny_models[flavour], cfg, load_vision=False)
    frames = torch.randn(2, 2, 17, 32, generator=torch.Generator().manual_seed(0))  # (B, T, L, D)
    answers = ["red", "a red square moves left"]
    # The shared prompt given per example is the shared prompt.
    same = model.ce_loss(frames, answers, prompts=[model.prompt] * 2)
    assert torch.allclose(same, model.ce_loss(frames, answers), atol=1e-6)
    # Prompts of different lengths: each example scores as it would alone (padding is masked).
    ids = model.generate(frames, num_beams=1, max_new_tokens=4, min_new_tokens=2, prompts=PROMPTS).token_ids
    together = model.sequence_logprobs(frames, ids, prompts=PROMPTS)
    alone = torch.cat(
        [
            model.sequence_logprobs(frames[i : i + 1], ids[i : i + 1], prompts=PROMPTS[i : i + 1])
            for i in range(2)
        ]
    )
    assert torch.allclose(together, alone, atol=1e-5)
    texts = [
        model.generate(
            frames[i : i + 1], num_beams=3, max_new_tokens=4, min_new_tokens=1, prompts=PROMPTS[i : i + 1]
        ).texts[0]
        for i in range(2)
    ]
    assert (
        model.generate(frames, num_beams=3, max_new_tokens=4, min_new_tokens=1, prompts=PROMPTS).texts
        == texts
    )


# --------------------------------------------------------------------------------------------
# The captioning cache serves QA; a tiny QA run end to end
# --------------------------------------------------------------------------------------------


def test_qa_config_at_the_captioning_cache_extracts_nothing(tmp_path):

    world = make_synthetic_world(tmp_path / "world", num_videos=6, seed=0)
    model = init_model(tmp_path / "tiny-t5", "tiny-t5", vocab_from=world["annotations"], seed=0)
    common = {"model": {"num_frames": 2, "image_size": 32}, "decode": {"backend": "pyav"},
              "cache": {"path": str(tmp_path / "features.zarr")}, "extract": {"decode_workers": 1}}  # fmt: skip
    caption = config_from_dict({**common, "run": {"output_dir": str(tmp_path / "caption")},
        "data": {"annotations": world["annotations"], "video_root": world["videos"]}, "model": {**common["model"], "pretrained": str(model)}})  # fmt: skip
    assert extract.run(caption)["done"] == 6
    chunks = {p: p.stat().st_mtime_ns for p in (tmp_path / "features.zarr").rglob("*") if p.is_file()}

    qa_model = add_words(model, tmp_path / "tiny-t5-qa", world["qa_annotations"])
    qa = config_from_dict({**common, "run": {"output_dir": str(tmp_path / "qa")},
        "data": {"annotations": world["qa_annotations"], "video_root": world["videos"], "task": "qa"},
        "model": {**common["model"], "pretrained": str(qa_model)}})  # fmt: skip
    summary = extract.run(qa)  # same videos, sampling and ViT (the QA model's new words leave it alone)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 6, 0)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "features.zarr").rglob("*") if p.is_file()} == chunks
    added = json.loads((qa_model / "qa_words.json").read_text())["added_words"]
    assert {"what", "colour", "which", "corners", "question", "answer"} <= set(added)


def test_tiny_qa_run_trains_and_evaluates_from_the_demo_cache(tiny_world, tmp_path):

    questions = Path(tiny_world["annotations"]).with_name("annotations_qa.jsonl")  # the world has them
    model = add_words(tiny_world["model"], tmp_path / "tiny-t5-qa", questions)
    config = tiny_config(
        {**tiny_world, "annotations": str(questions), "model": str(model)},
        tmp_path / "run",
        data={"task": "qa"},
        model={"llm": "full"},
        train={"epochs": 2, "captions": "all"},
        scst={
            "max_steps": 2,
            "batch_size": 4,
            "samples": 3,
            "baseline": "mean",
            "checkpoint_every": 2,
            "log_every": 1,
        },
        eval={"models": ["ce", "scst"]},
    )
    trained = train.run(config)
    history = [json.loads(row) for row in (tmp_path / "run/train/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in history if r["kind"] == "step"]
    assert trained["steps"] == 2 * 15 and losses[-1] < losses[0]  # 12 videos x 5 questions, batch 4
    val = json.loads((tmp_path / "run/train/val/epoch_002.json").read_text())
    assert len(val) == 4 * 5 and set(val) == {f"synth{i:04d}_{j}" for i in range(12, 16) for j in range(5)}
    assert "val accuracy" in (tmp_path / "run/train/log.txt").read_text()  # QA validates by accuracy
    assert scst.run(config)["steps"] == 2
    summary = eval_stage.run(config)
    for name in ("ce", "scst"):
        metrics = summary["metrics"][name]
        assert metrics["num_questions"] == 20 and metrics["unanswered"] == 0
        assert set(metrics["by_type"]) == {"what", "other", "where", "how"}
        rows = json.loads((tmp_path / f"run/eval/{name}/predictions.json").read_text())
        assert len(rows) == 20 and all(r["prediction"] for r in rows)  # at least one token each
        assert set(per_question_accuracy(rows)) == {"color", "shape", "direction", "end", "corners"}
    log = (tmp_path / "run/eval/log.txt").read_text()
    assert "top-1 accuracy x 100" in log


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
QA_PRESETS = {  # QA preset -> the captioning preset whose cache it reads, and the published train size
    "msrvtt_qa_t5xl": ("msrvtt_t5xl_ce", 158_581),
    "msvd_qa_t5xl": ("msvd_t5xl_lora_scst", 30_933),
}


@pytest.mark.parametrize("preset", sorted(QA_PRESETS))
def test_qa_presets_read_their_captioning_cache_with_the_seed_recipe(preset):

    qa, (captioning, questions) = load_config(ROOT / f"configs/{preset}.yaml"), QA_PRESETS[preset]
    caption = load_config(ROOT / f"configs/{captioning}.yaml")
    # The captioning cache, read with its own frames, image size, views, seed and decoder: no extraction.
    same = (
        "cache.path",
        "cache.train_views",
        "model.num_frames",
        "model.image_size",
        "run.seed",
        "decode.backend",
    )
    for key in same:
        section, name = key.split(".")
        assert getattr(getattr(qa, section), name) == getattr(getattr(caption, section), name), key
    assert qa.data.task == "qa" and qa.model.llm == "frozen"  # the paper's QA row: Q-Former only
    assert (qa.qa.num_beams, qa.qa.max_new_tokens, qa.qa.length_penalty) == (5, 10, -1.0)  # predict_answers
    assert qa.qa.prompt == "Question: {} Short answer:" and qa.qa.dataset in preset
    train, scst = plan_config(qa, gpus=8)
    assert (train.examples_per_epoch, train.total_steps, train.global_batch, train.gpu_batch) == (
        questions,
        15_000,
        512,
        64,
    )
    assert (qa.train.lr, qa.train.min_lr, qa.train.warmup_steps) == (5e-5, 1e-5, 1000)
    assert (scst.global_batch, scst.gpu_batch) == (16, 2)
    assert train.prompt == "Question: {} Short answer:"  # `vidcap plan` shows what QA generates
    assert train.generation["eval"] == {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1}
    assert train.generation["validation"]["select"] == "accuracy"
    assert scst.generation["samples"]["max_new_tokens"] == 10


def test_demo_qa_reads_the_captioning_demos_cache():

    qa, caption = load_config(ROOT / "configs/demo_qa.yaml"), load_config(ROOT / "configs/demo.yaml")
    assert qa.cache_path == caption.cache_path and qa.data.task == "qa"
    for key in ("run.seed", "run.demo_videos", "model.num_frames", "model.image_size", "cache.train_views",
                "decode.backend", "data.video_root"):  # fmt: skip
        section, name = key.split(".")
        assert getattr(getattr(qa, section), name) == getattr(getattr(caption, section), name), key
    assert Path(qa.data.annotations).parent == Path(caption.data.annotations).parent  # one world
    assert qa.model.pretrained == caption.model.pretrained + "-qa"  # pipeline.demo.qademo.QA_SUFFIX

    base = caption_demo_config(qa)  # what `prepare: demo` builds first
    assert (base.data.task, base.data.annotations, base.model.pretrained) == (
        "caption",
        caption.data.annotations,
        caption.model.pretrained,
    )
