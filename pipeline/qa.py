"""Video question answering from the same cache: questions, answers, training data and scoring.

MSRVTT-QA and MSVD-QA ask questions about the videos of MSR-VTT and MSVD, so the frame tokens
`extract` cached for captioning serve them too (`data.task: qa`, with `cache.path` at the
captioning cache). What changes is the text: the language model reads a prompt built from the
question (`qa.prompt`, BLIP-2's ``"Question: {} Short answer:"``) and learns to write the answer;
`eval` generates answers with BLIP-2's `predict_answers` settings and scores top-1 accuracy.

Formats (`data.format` with `data.task: qa`):

* ``lavis`` / ``msvd``: the folder of LAVIS's QA annotations, as its video QA builders read them:
  ``qa_train.json``, ``qa_val.json``, ``qa_test.json``, each a list of rows
  ``{"video": "video7010.mp4", "question": ..., "answer": ..., "question_id": ...}``, plus the
  training answer vocabulary ``train_ans2label.json`` (LAVIS stores it as ``qa_ans2label.json``)
  ``{answer: label}``. LAVIS keeps them beside ``cap_*.json`` in one ``annotations/`` folder:
  `extract` reads the videos from the caption files there, so both tasks share one cache.
* ``jsonl``: our generic rows with a ``qa`` list,
  ``{"video_id", "video", "split", "captions": [...], "qa": [{"question", "answer"}]}``: one
  manifest may hold captions and questions; the caption reader ignores ``qa``.

Scoring: an answer is right when it equals the reference after the VQA normalisation
(`normalize_answer`: lowercase, punctuation and articles dropped, number words as digits).
Accuracy is reported overall and per question type, the question's first word (what, who, how,
when, where; anything else is `other`), MSRVTT-QA's categories.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.annotations import VideoRecord
from pipeline.config import Config, DataConfig, QaConfig
from pipeline.data import Example, TrainPlan, make_source
from pipeline.errors import AnnotationError
from pipeline.runtime.distributed import DistEnv, broadcast, gather
from pipeline.runtime.stage import StageError
from pipeline.text import clean_caption, sanitize_caption
from pipeline.training import Job

QA_SPLITS = ("train", "val", "test")
ANSWER_LABEL_FILES = ("train_ans2label.json", "qa_ans2label.json")
"""The training answer vocabulary: LAVIS's download name, then the name it stores it under."""
QUESTION_TYPES = ("what", "who", "how", "when", "where", "other")


# ---------------------------------------------------------------------------------------
# Questions and where they come from
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QaItem:
    video_id: str
    question: str
    """As written in the annotations (cleaned by `clean_question` when it becomes a prompt)."""
    answers: tuple[str, ...]
    """Accepted answers; the first is the training target (LAVIS's files hold one per question)."""
    question_id: str
    """Unique within its split: the key of predictions."""

    @property
    def answer(self) -> str:
        return self.answers[0]


@dataclass
class QaData:
    """The questions of a dataset per split, and the videos they are about."""

    items: dict[str, list[QaItem]]
    videos: dict[str, str]
    """video_id -> absolute path of the video file."""
    source: str
    answer_labels: dict[str, int] | None = None
    """The training answer vocabulary (LAVIS `train_ans2label.json`), when there is one."""

    def splits(self) -> list[str]:
        return list(self.items)

    def split(self, name: str) -> list[QaItem]:
        if name not in self.items:
            raise AnnotationError(
                f"{self.source}: no questions for split {name!r}; splits are {self.splits()}"
            )
        return self.items[name]

    def records(self, split: str) -> list[VideoRecord]:
        """The split's videos in order of their first question (no captions): what sources read."""
        ids = dict.fromkeys(item.video_id for item in self.split(split))
        return [VideoRecord(v, self.videos[v], split) for v in ids]

    def out_of_vocabulary(self, split: str) -> float:
        """Share of the split's questions whose answer is not in the training answer vocabulary."""
        if not self.answer_labels or not self.split(split):
            return 0.0
        items = self.split(split)
        return sum(item.answer not in self.answer_labels for item in items) / len(items)


def load_qa(data: DataConfig) -> QaData:
    """The questions a config's `data` section names, with `data.max_videos` applied per split."""
    if not data.annotations:
        raise AnnotationError("data.task=qa but no data.annotations given")
    if isinstance(data.annotations, list):
        raise AnnotationError(
            f"data.task=qa reads one annotations file or folder, not a list: {data.annotations}"
        )
    path = Path(data.annotations).expanduser()
    if not path.exists():
        raise AnnotationError(f"{path}: annotations not found")
    if data.format == "jsonl":
        qa = read_jsonl_qa(path, data.video_root, data.video_ext)
    elif data.format in ("lavis", "msvd"):
        qa = read_lavis_qa(path, data.video_root, data.video_ext)
    else:
        raise AnnotationError(
            f"data.task=qa reads data.format jsonl or lavis/msvd (LAVIS qa_*.json), not {data.format!r}"
        )
    if data.max_videos > 0:
        for split, items in qa.items.items():
            keep = set(list(dict.fromkeys(i.video_id for i in items))[: data.max_videos])
            qa.items[split] = [i for i in items if i.video_id in keep]
    return qa


def read_lavis_qa(folder: Path, video_root: str | Path = "", video_ext: str = ".mp4") -> QaData:
    """LAVIS video QA annotations: ``qa_<split>.json`` rows and ``train_ans2label.json`` (see the module doc)."""
    if not folder.is_dir():
        raise AnnotationError(f"{folder}: LAVIS QA annotations are a folder holding qa_<split>.json files")
    files = [folder / f"qa_{s}.json" for s in QA_SPLITS if (folder / f"qa_{s}.json").is_file()]
    if not files:
        raise AnnotationError(
            f"{folder}: no qa_<split>.json files (expected qa_train.json, qa_val.json, qa_test.json)"
        )
    root = Path(video_root) if str(video_root) else folder
    items: dict[str, list[QaItem]] = {}
    videos: dict[str, str] = {}
    for file in files:
        split = file.stem[3:]
        rows = _load_json(file)
        if not isinstance(rows, list):
            raise AnnotationError(f"{file}: top level: expected a list of rows, got {type(rows).__name__}")
        items[split] = []
        for i, row in enumerate(rows):
            where = f"{file}: row {i}"
            if not isinstance(row, dict):
                raise AnnotationError(f"{where}: expected an object, got {type(row).__name__}")
            video = row.get("video") or (_text(row, "video_id", where) + video_ext)
            if not isinstance(video, str):
                raise AnnotationError(f"{where}: 'video' must be a string, got {video!r}")
            video_id = Path(video).stem
            videos.setdefault(video_id, os.path.abspath(os.path.join(root, video)))
            question_id = str(row.get("question_id", f"{split}_{i}"))
            items[split].append(
                QaItem(video_id, _text(row, "question", where), _answers(row, where), question_id)
            )
        _check_unique(items[split], file)
    labels_file = next((folder / n for n in ANSWER_LABEL_FILES if (folder / n).is_file()), None)
    labels = _load_json(labels_file) if labels_file else None
    if labels is not None and not isinstance(labels, dict):
        raise AnnotationError(f"{labels_file}: expected an object {{answer: label}}")
    return QaData(items, videos, str(folder), labels)


def read_jsonl_qa(path: Path, video_root: str | Path = "", video_ext: str = ".mp4") -> QaData:
    """Our JSONL with a ``qa`` list per video; ``question_id`` defaults to ``<video_id>_<j>``."""
    root = Path(video_root) if str(video_root) else path.parent
    items: dict[str, list[QaItem]] = {}
    videos: dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}:{number}: invalid JSON: {e.msg}") from None
            where = f"{path}: line {number}"
            if not isinstance(row, dict):
                raise AnnotationError(f"{where}: expected a JSON object")
            video_id, split = _text(row, "video_id", where), _text(row, "split", where)
            videos[video_id] = os.path.abspath(os.path.join(root, row.get("video") or video_id + video_ext))
            questions = row.get("qa") or []
            if not isinstance(questions, list):
                raise AnnotationError(f"{where} (video_id {video_id!r}): 'qa' must be a list")
            for j, qa in enumerate(questions):
                at = f"{where} (video_id {video_id!r}) qa[{j}]"
                if not isinstance(qa, dict):
                    raise AnnotationError(f"{at}: expected an object with question and answer")
                question_id = str(qa.get("question_id", f"{video_id}_{j}"))
                items.setdefault(split, []).append(
                    QaItem(video_id, _text(qa, "question", at), _answers(qa, at), question_id)
                )
    if not items:
        raise AnnotationError(f"{path}: no row has a 'qa' list of questions")
    for split_items in items.values():
        _check_unique(split_items, path)
    return QaData(items, videos, str(path))


def _answers(row: dict, where: str) -> tuple[str, ...]:
    """`answer` (a string) or `answers` (a list of accepted strings)."""
    value = row.get("answer", row.get("answers"))
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise AnnotationError(
            f"{where}: 'answer' must be a non-empty string or list of strings, got {value!r}"
        )
    return tuple(values)


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise AnnotationError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _check_unique(items: Sequence[QaItem], file: Path) -> None:
    counts = Counter(item.question_id for item in items)
    repeated = [q for q, n in counts.items() if n > 1]
    if repeated:
        raise AnnotationError(f"{file}: question_id {repeated[0]!r} appears {counts[repeated[0]]} times")


def _load_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{file}:{e.lineno}: invalid JSON: {e.msg}") from None
    except OSError as e:
        raise AnnotationError(f"{file}: cannot read: {e.strerror}") from None


# ---------------------------------------------------------------------------------------
# Text: prompts, answer normalisation, question types
# ---------------------------------------------------------------------------------------

_QUESTION_STRIPPED = re.compile(r'[.!"()*#:;~]')
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
"""The VQA evaluation's number words (its `manualMap`)."""
ARTICLES = frozenset({"a", "an", "the"})


def clean_question(question: str, max_words: int = 50) -> str:
    """LAVIS's question processing: lowercase, ``.!"()*#:;~`` removed, at most 50 words ("?" stays)."""
    text = _QUESTION_STRIPPED.sub("", sanitize_caption(question).lower())
    return " ".join(text.split()[:max_words])


def qa_prompt(template: str, question: str) -> str:
    """The language model's prompt for one question: `qa.prompt` with the cleaned question in `{}`."""
    return template.replace("{}", clean_question(question), 1)


def normalize_answer(text: str) -> str:
    """The VQA answer normalisation: lowercase, punctuation and articles out, number words as digits.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("the T-shirt")
    't shirt'
    """
    text = sanitize_caption(text).lower()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # a period, unless a decimal point
    text = text.replace("'", "")  # don't -> dont, man's -> mans
    text = re.sub(r"[^\w\s.]|_", " ", text)  # other punctuation separates words (t-shirt -> t shirt)
    return " ".join(NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES)


def question_type(question: str) -> str:
    """what, who, how, when, where (the question's first word), else other."""
    words = clean_question(question).replace("?", " ").split()
    first = words[0] if words else ""
    return first if first in QUESTION_TYPES[:-1] else "other"


def is_correct(prediction: str, answers: Iterable[str]) -> bool:
    """Top-1 exact match after `normalize_answer`, against any accepted answer."""
    guess = normalize_answer(prediction)
    return any(guess == normalize_answer(a) for a in answers)


def qa_accuracy(items: Sequence[QaItem], predictions: Mapping[str, str], group: Any = None) -> dict[str, Any]:
    """Accuracy (0..1) of `predictions` ({question_id: answer}) on `items`, overall and per group.

    `group(item) -> name` (default: `question_type`); a question without a prediction counts as
    wrong and is counted under `unanswered`.
    """
    group = group or (lambda item: question_type(item.question))
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for item in items:
        name = group(item)
        total[name] += 1
        guess = predictions.get(item.question_id)
        right[name] += guess is not None and is_correct(guess, item.answers)
    n = sum(total.values())
    return {
        "accuracy": sum(right.values()) / n if n else 0.0,
        "num_questions": n,
        "unanswered": sum(item.question_id not in predictions for item in items),
        "by_type": {
            name: {"accuracy": right[name] / total[name], "num_questions": total[name]} for name in total
        },
    }


# ---------------------------------------------------------------------------------------
# Training: a plan of (video, question prompt, answer), validation accuracy, the SCST reward
# ---------------------------------------------------------------------------------------


class QaPlan(TrainPlan):
    """`TrainPlan` over questions: each example is a video, its prompted question and the answer.

    `captions="sample"`: each video once per epoch with one random question of its own;
    `"all"`: every question (LAVIS iterates over question rows).
    """

    def __init__(
        self,
        items: Sequence[QaItem],
        template: str,
        seed: int,
        captions: str = "sample",
        num_views: int = 1,
        global_batch: int = 1,
        fresh_views: bool = False,
    ):
        self.template = template
        super().__init__(items, seed, captions, num_views, global_batch, fresh_views)

    def video_targets(self, items: Sequence[QaItem]) -> list[tuple[str, list[tuple[str, str]]]]:
        """`(video_id, [(prompt, cleaned answer)])` per video, in order of its first question."""
        grouped: dict[str, list[tuple[str, str]]] = {}
        for item in items:
            answer = clean_caption(item.answer)
            if answer:
                grouped.setdefault(item.video_id, []).append(
                    (qa_prompt(self.template, item.question), answer)
                )
        return list(grouped.items())

    def example(self, video_id: str, view: int, target: Any) -> Example:
        prompt, answer = target
        return Example(video_id, view, answer, prompt=prompt)


@dataclass
class QaValidation:
    """The validation questions and how to answer them (greedy, `qa` lengths)."""

    items: list[QaItem]
    template: str
    batch_size: int = 16
    max_new_tokens: int = 10
    min_new_tokens: int = 1

    @property
    def video_ids(self) -> list[str]:
        return list(dict.fromkeys(item.video_id for item in self.items))


@torch.no_grad()
def answer_questions(
    model: Any,
    source: Any,
    items: Sequence[QaItem],
    template: str,
    batch_size: int,
    device: Any,
    **generate: Any,
) -> dict[str, str]:
    """`{question_id: answer}` from view 0 of each question's video (`generate` goes to `model.generate`).

    Each video of a batch is read once however many questions it has; a video the source cannot
    read (undecodable) leaves its questions unanswered.
    """
    answers: dict[str, str] = {}
    for start in range(0, len(items), batch_size):
        batch = list(items[start : start + batch_size])
        unique = list(dict.fromkeys(item.video_id for item in batch))
        loaded, kept = source.reader.load(unique, [0] * len(unique))
        row = {unique[i]: j for j, i in enumerate(kept)}
        batch = [item for item in batch if item.video_id in row]
        if not batch:
            continue
        tokens = source.encode(loaded, device)[[row[item.video_id] for item in batch]]  # (B, T, L, D)
        prompts = [qa_prompt(template, item.question) for item in batch]
        out = model.generate(tokens, prompts=prompts, **generate)
        answers.update(zip([item.question_id for item in batch], out.texts, strict=True))
    return answers


def validate_qa(
    model: Any, source: Any, val: QaValidation, env: DistEnv
) -> tuple[dict[str, float], dict[str, str]]:
    """Greedy answers to the validation questions (sharded over ranks) and their accuracy (0..1).

    Scores as `pipeline.training.validate` returns them: the loop keeps the best by `val_score` and
    logs `val_cider`, both the accuracy here; `val_accuracy` names it.
    """
    was_training = model.training
    model.eval()
    mine = answer_questions(
        model,
        source,
        val.items[env.rank :: env.world_size],
        val.template,
        val.batch_size,
        env.device,
        num_beams=1,
        max_new_tokens=val.max_new_tokens,
        min_new_tokens=val.min_new_tokens,
    )
    model.train(was_training)
    predictions: dict[str, str] = {}
    for part in gather(env, mine):
        predictions.update(part)
    score = float(
        broadcast(env, qa_accuracy(val.items, predictions)["accuracy"] if env.master_process else 0.0)
    )
    return {"val_cider": score, "val_score": score, "val_accuracy": score}, predictions


def build_qa_job(
    config: Config,
    model: Any,
    stage: Any,
    env: Any,
    settings: Any,
    start_is_candidate: bool = False,
) -> Job:
    """`pipeline.training.build_job` for `data.task: qa`: questions from `load_qa`, frames from the same sources."""
    qa = load_qa(config.data)
    train_items = qa.split(config.data.train_split)
    val_items = qa.split(config.data.val_split)
    records = qa.records(config.data.train_split) + qa.records(config.data.val_split)
    source = make_source(config, model, records, config.train.source)
    available = set(source.available([r.video_id for r in records]))
    skipped = [r.video_id for r in records if r.video_id not in available]
    if skipped:
        stage.log.warning(
            "%d videos with questions are not in the %s (failed or not extracted), e.g. %s; training without them",
            len(skipped),
            config.train.source,
            ", ".join(skipped[:5]),
        )
    train_items = [item for item in train_items if item.video_id in available]
    if not train_items:
        raise StageError(
            f"no question of split {config.data.train_split!r} is about a video available from the {config.train.source}"
        )
    val_videos = [v for v in dict.fromkeys(i.video_id for i in val_items) if v in available]
    if config.train.val_max_videos:
        val_videos = val_videos[: config.train.val_max_videos]
    keep = set(val_videos)
    plan = QaPlan(
        train_items,
        config.qa.prompt,
        config.run.seed,
        settings.captions,
        num_views=source.num_views,
        global_batch=settings.batch_size,
        fresh_views=source.fresh_views,
    )
    validation = QaValidation(
        [item for item in val_items if item.video_id in keep],
        config.qa.prompt,
        batch_size=config.eval.batch_size,
        max_new_tokens=config.qa.max_new_tokens,
        min_new_tokens=config.qa.min_new_tokens,
    )
    return Job(
        plan,
        source,
        settings,
        validation,
        stage.dir,
        env,
        stage.log,
        fingerprint_settings=stage.settings,
        start_is_candidate=start_is_candidate,
        validator=validate_qa,
    )


class ExactMatchReward:
    """SCST reward for QA: 1 when a sampled answer matches the question's answer (`is_correct`), else 0.

    The scorer interface of `pipeline.cider.cider_d_reward`, keyed by the batch's reference answers
    instead of video ids: `score_candidates(answers, candidates) -> (C,)`. Exact match is the metric
    QA is scored by, so SCST optimises what is reported, as it does with CIDEr for captions; CIDEr-D
    of one- or two-word answers would rest on unigrams alone, with document frequencies that make
    frequent answers ("man", "2") worth less than rare ones.
    """

    def score_candidates(self, answers: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        if len(answers) != len(candidates):
            raise ValueError(f"{len(answers)} answers but {len(candidates)} candidates")
        return np.array([float(is_correct(c, [a])) for a, c in zip(answers, candidates, strict=True)])


def answer_generation(qa: QaConfig) -> dict[str, Any]:
    """`model.generate` settings of evaluation answers (BLIP-2 `predict_answers`: 5 beams, 10 tokens)."""
    return dict(
        num_beams=qa.num_beams,
        max_new_tokens=qa.max_new_tokens,
        min_new_tokens=qa.min_new_tokens,
        length_penalty=qa.length_penalty,
    )


# ---------------------------------------------------------------------------------------
# The results table, with the paper's numbers
# ---------------------------------------------------------------------------------------

PAPER_QA: list[tuple[str, dict[str, float]]] = [
    ("paper: Flan-T5-XL, Q-Former only", {"msrvtt": 23.9, "msvd": 38.8}),
    ("paper: Flan-T5-XL, Q-Former only + SCST", {"msrvtt": 24.1, "msvd": 41.0}),
    ("paper: OPT-2.7B", {"msrvtt": 16.5, "msvd": 35.7}),
    ("paper: Vicuna-7B", {"msrvtt": 20.2, "msvd": 38.5}),
    ("paper: all modules trainable", {"msrvtt": 18.1, "msvd": 36.2}),
]
"""Top-1 accuracy (x100) on the MSRVTT-QA / MSVD-QA test sets, from the paper's appendix (Table 3)."""
QA_DATASET_NAMES = {"msrvtt": "MSRVTT-QA", "msvd": "MSVD-QA"}


def qa_dataset(config: Config) -> str:
    """Which published QA numbers apply: `qa.dataset`, else `data.format` when it names one."""
    return config.qa.dataset or (config.data.format if config.data.format in QA_DATASET_NAMES else "")


def format_qa_table(ours: Mapping[str, Mapping[str, Any]], dataset: str = "", split: str = "") -> str:
    """Accuracy x100 of our models, overall and per question type, then the paper's rows for `dataset`."""
    published = [(name, numbers[dataset]) for name, numbers in PAPER_QA if dataset in numbers]
    names = list(ours) + [name for name, _ in published]
    width = max([len("model"), *map(len, names)]) + 2
    columns = ["all", *QUESTION_TYPES]
    header = f"{'model':<{width}}" + "".join(f"{c:>8}" for c in columns) + f"{'questions':>11}"
    lines = [header, "-" * len(header)]
    for name, metrics in ours.items():
        by_type = metrics.get("by_type", {})
        cells = [metrics.get("accuracy")] + [by_type.get(t, {}).get("accuracy") for t in QUESTION_TYPES]
        lines.append(
            f"{name:<{width}}"
            + "".join(f"{100 * c:>8.1f}" if c is not None else f"{'-':>8}" for c in cells)
            + f"{metrics.get('num_questions', 0):>11}"
        )
    if published:
        lines.append("-" * len(header))
        lines += [
            f"{name:<{width}}{value:>8.1f}" + f"{'-':>8}" * len(QUESTION_TYPES) for name, value in published
        ]
    where = " ".join(filter(None, [QA_DATASET_NAMES.get(dataset, ""), split]))
    lines.append(
        f"(top-1 accuracy x 100 after VQA answer normalisation{'; ours on ' + where if where else ''})"
    )
    return "\n".join(lines)
