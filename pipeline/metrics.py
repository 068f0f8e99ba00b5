"""The coco-caption metrics (pycocoevalcap): BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), SPICE.

What this wrapper adds to calling pycocoevalcap directly:
* every caption is sanitised to one line first (`pipeline.text.sanitize_caption`): the PTB
  tokenizer and METEOR talk to java one caption per line, and a caption holding \\r or U+2028
  would silently shift every later caption onto the wrong video;
* java runs with a C.UTF-8 / en locale, so METEOR never prints decimal commas and non-ASCII
  text survives the round trip; a missing java is reported as `JavaNotFoundError`;
* references and candidates are tokenised together in one java call, and each java
  program starts once per evaluation.

    scores = coco_scores(gts={"v1": ["a man sings", ...]}, res={"v1": "a man is singing"})
    scores = score_files("annotations/test_gt.json", "results/test.json")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from pipeline.cider import CiderD
from pipeline.errors import AnnotationError, JavaNotFoundError
from pipeline.runtime.files import read_text_file
from pipeline.text import sanitize_caption

log = logging.getLogger(__name__)

METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
DEFAULT_METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr")
K = TypeVar("K", bound=Hashable)


def require_java() -> None:
    """Raise `JavaNotFoundError` now, when coco-caption's tokenizer and METEOR could not run later."""
    if shutil.which("java") is None:
        raise JavaNotFoundError()


@contextlib.contextmanager
def _java_environment() -> Iterator[None]:
    """Make every java that pycocoevalcap spawns run with an English, UTF-8 locale.

    pycocoevalcap starts java with the inherited environment, so set os.environ for the
    duration and restore it after. JAVA_TOOL_OPTIONS covers JVMs that ignore LC_ALL (no
    C.UTF-8 locale installed); java notes it on stderr, which no parser reads.
    """
    options = "-Dfile.encoding=UTF-8 -Duser.language=en -Duser.country=US"
    override = {
        "LC_ALL": "C.UTF-8",
        "LANG": "C.UTF-8",
        "JAVA_TOOL_OPTIONS": f"{os.environ.get('JAVA_TOOL_OPTIONS', '')} {options}".strip(),
    }
    saved = {key: os.environ.get(key) for key in override}
    os.environ.update(override)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ptb_tokenize(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """coco-caption's PTB tokenisation: Stanford PTBTokenizer (lowercased), punctuation dropped.

    Same jar, flags and punctuation filter as pycocoevalcap's `PTBTokenizer`, with captions
    sanitised to one line, java's input passed on stdin (pycocoevalcap writes a temporary
    file into site-packages) and the output checked to hold exactly one line per caption.
    """

    require_java()
    keys = [key for key, caps in captions.items() for _ in caps]
    lines = [sanitize_caption(c) for caps in captions.values() for c in caps]
    jar_dir = Path(ptbtokenizer.__file__).parent
    cmd = ["java", "-cp", ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR, "edu.stanford.nlp.process.PTBTokenizer"]
    with _java_environment():
        proc = subprocess.run(
            [*cmd, "-preserveLines", "-lowerCase"],
            cwd=jar_dir,
            input="\n".join(lines).encode(),
            capture_output=True,
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed (exit {proc.returncode}): {proc.stderr.decode()[-2000:]}")
    out = proc.stdout.decode().split("\n")
    if len(out) == len(lines) + 1 and out[-1] == "":
        out.pop()
    if len(out) != len(lines):
        raise RuntimeError(f"PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    tokenized: dict[K, list[str]] = {key: [] for key in captions}
    for key, line in zip(keys, out, strict=True):
        tokenized[key].append(
            " ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS)
        )
    return tokenized


def coco_scores(
    gts: Mapping[str, Sequence[str]],
    res: Mapping[str, str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    per_video: bool = False,
) -> dict:
    """coco-caption scores of one candidate per video against its references.

    Returns pycocoevalcap's names: Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr (and SPICE when asked
    for and it can run; offline it cannot, and is skipped with a logged note). Videos in gts
    without a candidate are left out, as COCOEvalCap does. With per_video, the result also
    holds "per_video": {video id: {metric: score}}.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    for video_id, caption in res.items():
        if not isinstance(caption, str):
            raise ValueError(f"candidate for {video_id!r} must be a string, got {type(caption).__name__}")
        refs = gts.get(video_id)
        if not refs:
            raise ValueError(f"candidate {video_id!r} has no reference captions")
        if isinstance(refs, str):
            raise ValueError(f"references of {video_id!r} must be a list of strings, got one string")
    if not res:
        raise ValueError("no candidates to score")
    if len(gts) > len(res):
        log.info("scoring %d of %d videos with references (the ones with a candidate)", len(res), len(gts))

    both = ptb_tokenize(
        {**{("gts", v): list(gts[v]) for v in res}, **{("res", v): [c] for v, c in res.items()}}
    )
    gts_tok = {v: both["gts", v] for v in res}
    res_tok = {v: both["res", v] for v in res}
    scores: dict = {}
    per: dict[str, dict[str, float]] = {v: {} for v in res}
    for metric in metrics:
        for name, total, each in _run_metric(metric, gts_tok, res_tok):
            scores[name] = float(total)
            for video_id, value in zip(res, each, strict=True):
                per[video_id][name] = float(value)
    if per_video:
        scores["per_video"] = per
    return scores


def _run_metric(metric: str, gts: dict[str, list[str]], res: dict[str, list[str]]) -> list[tuple]:
    """[(score name, corpus score, per-video scores)] for one pycocoevalcap metric."""
    if metric == "Bleu":
        totals, each = Bleu(4).compute_score(gts, res, verbose=0)
        return [(f"Bleu_{i + 1}", totals[i], each[i]) for i in range(4)]
    if metric == "METEOR":
        return [("METEOR", *_meteor(gts, res))]
    if metric == "ROUGE_L":
        return [("ROUGE_L", *Rouge().compute_score(gts, res))]
    if metric == "CIDEr":
        return [("CIDEr", *Cider().compute_score(gts, res))]
    spice = _spice(gts, res)
    return [("SPICE", *spice)] if spice else []


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:

    # "|||" separates fields in METEOR's protocol; pycocoevalcap strips it from candidates only.
    gts = {v: [r.replace("|||", "") for r in refs] for v, refs in gts.items()}
    with _java_environment():
        meteor = Meteor()
    try:
        return meteor.compute_score(gts, res)
    except ValueError as err:  # an empty or non-numeric line: java died or printed an error
        if meteor.lock.locked():  # compute_score raised holding it; Meteor.__del__ would deadlock
            meteor.lock.release()
        meteor.meteor_p.kill()
        raise RuntimeError(f"METEOR failed: {meteor.meteor_p.stderr.read().decode()[-2000:]}") from err
    finally:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.wait()


def _spice(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]] | None:
    """SPICE if its Stanford CoreNLP models are installed and it runs; None (logged) if not."""
    from pycocoevalcap.spice import get_stanford_models, spice

    jar = Path(get_stanford_models.SPICEDIR) / get_stanford_models.SPICELIB / f"{get_stanford_models.JAR}.jar"
    if not jar.exists():
        log.warning(
            "SPICE skipped: it needs %s, which pycocoevalcap downloads on first use (needs network; "
            "run `python -c 'from pycocoevalcap.spice.spice import Spice; Spice()'` once online)",
            jar.name,
        )
        return None
    try:
        with _java_environment():
            total, each = spice.Spice().compute_score(gts, res)
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError) as err:
        log.warning("SPICE skipped: it failed to run (%s)", err)
        return None
    return total, [item["All"]["f"] for item in each]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def load_references(path: str | Path) -> dict[str, list[str]]:
    """References from a COCO-style ground truth ({"annotations": [{"image_id", "caption"}]})
    or a JSONL manifest (rows {"video_id", "captions": [...]}; rows without captions skipped)."""
    path = Path(path)
    text = read_text_file(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    refs: dict[str, list[str]] = {}
    if isinstance(whole, dict) and "annotations" in whole:
        for i, ann in enumerate(whole["annotations"]):
            video_id, caption = _fields(path, f"annotation {i}", ann, ("image_id",), "caption")
            refs.setdefault(video_id, []).append(caption)
        return refs
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise AnnotationError(
                f"{path}: line {line_no} is not JSON ({err.msg}); expected COCO JSON or JSONL"
            ) from None
        if not isinstance(row, dict) or "video_id" not in row:
            raise AnnotationError(
                f"{path}: line {line_no}: expected an object with 'video_id' and 'captions'"
            )
        captions = row.get("captions") or []
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise AnnotationError(f"{path}: line {line_no}: 'captions' must be a list of strings")
        if captions:
            refs.setdefault(str(row["video_id"]), []).extend(captions)
    if not refs:
        raise AnnotationError(f"{path}: no reference captions found")
    return refs


def load_results(path: str | Path) -> dict[str, str]:
    """Candidates from a JSON list of {"image_id" or "video_id", "caption"}."""
    path = Path(path)
    try:
        rows = json.loads(read_text_file(path))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(rows, list):
        raise AnnotationError(f"{path}: expected a JSON list of {{'image_id' or 'video_id', 'caption'}}")
    res: dict[str, str] = {}
    for i, row in enumerate(rows):
        video_id, caption = _fields(path, f"record {i}", row, ("image_id", "video_id"), "caption")
        if video_id in res:
            raise AnnotationError(f"{path}: record {i}: second caption for {video_id!r}")
        res[video_id] = caption
    return res


def _fields(path: Path, where: str, row: object, id_keys: tuple[str, ...], text_key: str) -> tuple[str, str]:
    if not isinstance(row, dict):
        raise AnnotationError(f"{path}: {where}: expected an object, got {type(row).__name__}")
    id_key = next((k for k in id_keys if k in row), None)
    if id_key is None or not isinstance(row.get(text_key), str):
        raise AnnotationError(
            f"{path}: {where}: needs {' or '.join(map(repr, id_keys))} and a string {text_key!r}: {row}"
        )
    return str(row[id_key]), row[text_key]


def score_files(
    gts_path: str | Path, res_path: str | Path, impl: str = "coco", metrics: Sequence[str] = DEFAULT_METRICS
) -> dict:
    """Score a results file against a ground-truth file.

    impl="coco": pycocoevalcap's metrics (`coco_scores`); impl="fast": CIDEr only, computed by
    `pipeline.cider` on the same PTB tokenisation (identical numbers, much faster).
    """
    if impl not in ("coco", "fast"):
        raise ValueError(f"impl must be 'coco' or 'fast', got {impl!r}")
    gts, res = load_references(gts_path), load_results(res_path)
    missing = [v for v in res if v not in gts]
    if missing:
        raise AnnotationError(
            f"{res_path}: {len(missing)} result ids have no references in {gts_path}: {missing[:10]}"
            + (" ..." if len(missing) > 10 else "")
        )
    if impl == "coco":
        return coco_scores(gts, res, metrics)

    tok = ptb_tokenize({**{("gts", v): gts[v] for v in res}, **{("res", v): [c] for v, c in res.items()}})
    score, _ = CiderD().compute_score({v: tok["gts", v] for v in res}, {v: tok["res", v][0] for v in res})
    return {"CIDEr": score}
