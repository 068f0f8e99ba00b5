"""coco-caption wrapper (`pipeline.metrics`).

METEOR's JVM loads a paraphrase table at start-up (10-50 s on 2 busy cores), so the default tests
score without it and one `slow` test runs the full set: `pytest -m slow tests/test_metrics.py`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from pipeline import metrics
from pipeline.metrics import JavaNotFoundError, coco_scores, ptb_tokenize, score_files

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="coco-caption metrics need java")

REFS = {
    "v_walk": ["A man is walking down the street.", "a person walks on a road", "a man walks outside"],
    "v_dog": ["a dog runs in the park", "The dog is running on grass!", "a brown dog running"],
    "v_cook": ["a woman is cooking pasta", "someone cooks food in a kitchen", "a lady prepares a meal"],
    "v_same": ["a red car drives on the highway at night"],
    "v_bad": ["a cat sleeps on a sofa", "a cat is sleeping"],
    "v_clean": ["a cat sleeps on a sofa", "a cat is sleeping"],
    "v_empty": ["a child plays with a ball", "a kid is playing"],
}
CANDIDATES = {
    "v_walk": "a man is walking on the street",
    "v_dog": "a dog is running in a park",
    "v_cook": "a man is playing guitar",
    "v_same": "a red car drives on the highway at night",
    "v_bad": "a cat\u2028sleeps on a\r sofa",  # would shift later captions without sanitising
    "v_clean": "a cat sleeps on a  sofa",
    "v_empty": "",
}
ALL_KEYS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
FAST_KEYS = ALL_KEYS - {"METEOR"}


@pytest.fixture(scope="module")
def scores():
    return coco_scores(REFS, CANDIDATES, metrics=("Bleu", "ROUGE_L", "CIDEr"), per_video=True)


def test_scores_present_and_in_range(scores):
    assert set(scores) == FAST_KEYS | {"per_video"}
    for key in FAST_KEYS - {"CIDEr"}:
        assert 0.0 < scores[key] <= 1.0, key
    assert 0.0 < scores["CIDEr"] < 10.0
    assert scores["Bleu_1"] >= scores["Bleu_2"] >= scores["Bleu_3"] >= scores["Bleu_4"]
    assert set(scores["per_video"]) == set(CANDIDATES)


def test_identical_candidate_scores_high(scores):
    same = scores["per_video"]["v_same"]
    assert same["CIDEr"] > 0 and same["Bleu_4"] > 0.9 and same["ROUGE_L"] == 1.0
    assert scores["per_video"]["v_cook"]["CIDEr"] < scores["per_video"]["v_dog"]["CIDEr"]


def test_line_breaks_in_a_caption_change_nothing(scores):
    # v_bad and v_clean have the same references; the \u2028 / \r caption must score as its
    # sanitised twin, and the captions after it must not shift (v_empty stays empty: 0).
    per = scores["per_video"]
    assert per["v_bad"] == pytest.approx(per["v_clean"], abs=1e-12)
    assert per["v_empty"] == {key: 0.0 for key in FAST_KEYS}


@pytest.mark.slow
def test_all_seven_scores_with_meteor():
    out = coco_scores(REFS, CANDIDATES, per_video=True)
    assert set(out) == ALL_KEYS | {"per_video"}
    assert 0.0 < out["METEOR"] < 1.0
    per = out["per_video"]
    assert per["v_same"]["METEOR"] > 0.9 and per["v_same"]["Bleu_4"] > 0.9
    assert per["v_bad"] == pytest.approx(per["v_clean"], abs=1e-12) and per["v_empty"]["METEOR"] == 0.0


def test_ptb_tokenize_matches_pycocoevalcap_and_keeps_lines():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    plain = {v: refs for v, refs in REFS.items() if v != "v_bad"}
    expected = PTBTokenizer().tokenize({v: [{"caption": c} for c in refs] for v, refs in plain.items()})
    nasty = {
        "a": ["one\rtwo", "three\u2028four\u2029five\x85six\x0bseven\x0c"],
        "b": ["", "."],
        "c": ["last one"],
    }
    got = ptb_tokenize({**plain, **nasty})
    assert {v: got[v] for v in plain} == expected
    assert got["a"] == ["one two", "three four five six seven"]
    assert got["b"] == ["", ""] and got["c"] == ["last one"]


def test_java_environment_is_restored(monkeypatch):
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    monkeypatch.delenv("JAVA_TOOL_OPTIONS", raising=False)
    with metrics._java_environment():
        assert os.environ["LC_ALL"] == "C.UTF-8" and "user.language=en" in os.environ["JAVA_TOOL_OPTIONS"]
    assert os.environ["LC_ALL"] == "de_DE.UTF-8" and "JAVA_TOOL_OPTIONS" not in os.environ


def test_missing_java_raises_before_pycocoevalcap(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(JavaNotFoundError, match="apt-get install default-jre-headless"):
        coco_scores({"v": ["a man"]}, {"v": "a man"})
    with pytest.raises(JavaNotFoundError):
        ptb_tokenize({"v": ["a man"]})


def test_input_checks():
    with pytest.raises(ValueError, match="'v2' has no reference"):
        coco_scores({"v1": ["a man"]}, {"v1": "a man", "v2": "a dog"})
    with pytest.raises(ValueError, match="list of strings"):
        coco_scores({"v1": "a man"}, {"v1": "a man"})
    with pytest.raises(ValueError, match="unknown metrics"):
        coco_scores({"v1": ["a man"]}, {"v1": "a man"}, metrics=("BLEURT",))


def test_spice_is_skipped_with_a_note_when_it_cannot_run(caplog, monkeypatch):
    from pycocoevalcap.spice import get_stanford_models

    # whatever this machine has installed, SPICE must find no CoreNLP jar here
    monkeypatch.setattr(get_stanford_models, "JAR", "no-such-corenlp-jar")
    with caplog.at_level(logging.WARNING, logger="pipeline.metrics"):
        out = coco_scores(
            {"v1": ["a man runs"], "v2": ["a dog"]},
            {"v1": "a man", "v2": "a dog"},
            metrics=("CIDEr", "SPICE"),
        )
    assert set(out) == {"CIDEr"} and "SPICE skipped" in caplog.text


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    coco = {"annotations": [{"image_id": i, "caption": c, "id": n} for n, (i, c) in enumerate(_pairs())]}
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    rows = [
        {"video_id": str(v), "video": f"{v}.mp4", "split": "test", "captions": caps} for v, caps in _grouped()
    ]
    rows.append({"video_id": "unlabelled", "video": "u.mp4", "split": "test", "captions": []})
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    results = [{"image_id": 0, "caption": "a man is walking"}, {"video_id": "1", "caption": "a dog runs"}]
    results.append({"image_id": 2, "caption": "a woman cooks"})
    (tmp_path / "res.json").write_text(json.dumps(results))
    return tmp_path


def _grouped():
    return [(0, REFS["v_walk"]), (1, REFS["v_dog"]), (2, REFS["v_cook"]), (3, REFS["v_same"])]


def _pairs():
    return [(v, c) for v, caps in _grouped() for c in caps]


def test_score_files_both_formats_and_both_impls(files):
    coco = score_files(files / "gt.json", files / "res.json", metrics=("Bleu", "CIDEr"))
    assert {"Bleu_4", "CIDEr"} <= set(coco) and coco["CIDEr"] > 0
    fast = score_files(files / "manifest.jsonl", files / "res.json", impl="fast")
    assert fast["CIDEr"] == pytest.approx(coco["CIDEr"], abs=1e-9)


def test_score_files_errors_name_file_and_record(files):
    (files / "extra.json").write_text(
        json.dumps([{"image_id": 0, "caption": "x"}, {"image_id": 99, "caption": "y"}])
    )
    with pytest.raises(ValueError, match=r"extra\.json.*\['99'\]"):
        score_files(files / "gt.json", files / "extra.json", impl="fast")
    (files / "broken.json").write_text(json.dumps([{"image_id": 0, "caption": "x"}, {"image_id": 1}]))
    with pytest.raises(ValueError, match=r"broken\.json: record 1"):
        score_files(files / "gt.json", files / "broken.json")
    (files / "bad.jsonl").write_text('{"video_id": "0", "captions": ["a"]}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2"):
        score_files(files / "bad.jsonl", files / "res.json")
    with pytest.raises(ValueError, match="impl"):
        score_files(files / "gt.json", files / "res.json", impl="java")


def test_a_failing_meteor_raises_and_does_not_hang(tmp_path):
    """METEOR answering garbage (java crashed, out of memory): a clear error, then a clean exit.

    pycocoevalcap raises while holding its lock and its `__del__` takes the lock again, which
    would hang the process for ever; run in a subprocess so a regression fails instead of hanging.
    """
    import subprocess
    import sys

    script = tmp_path / "meteor_fails.py"
    script.write_text(
        "import subprocess, threading\n"
        "import pycocoevalcap.meteor.meteor as mm\n"
        "def init(self):\n"
        "    self.meteor_p = subprocess.Popen(['cat'], stdin=subprocess.PIPE, stdout=subprocess.PIPE,\n"
        "                                     stderr=subprocess.PIPE)\n"
        "    self.lock = threading.Lock()\n"
        "mm.Meteor.__init__ = init  # echoes the request instead of scores\n"
        "from pipeline.metrics import _meteor\n"
        "try:\n"
        "    _meteor({'v': ['a man']}, {'v': ['a man']})\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
        "import gc; gc.collect()\n"
        "print('exited cleanly')\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "raised: METEOR failed" in out.stdout and "exited cleanly" in out.stdout
