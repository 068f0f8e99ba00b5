"""Annotation readers: every format becomes the same manifest; bad input names file and record."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.annotations import (
    AnnotationError,
    Manifest,
    VideoRecord,
    find_missing_videos,
    load_manifest,
    read_annotations,
    require_references,
)
from pipeline.app.cli import main
from pipeline.config import DataConfig, config_from_dict
from stages import eval as eval_stage


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def jsonl(*rows) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


# --- jsonl ---------------------------------------------------------------------------------


def test_jsonl_paths_captions_and_unknown_keys(tmp_path):
    file = write(
        tmp_path / "ann" / "a.jsonl",
        jsonl(
            {
                "video_id": "v1",
                "video": "clips/v1.mp4",
                "split": "train",
                "captions": ["A dog.", "a cat"],
                "facts": {},
            },
            "",
            {"video_id": "v2", "video": "/abs/v2.webm", "split": "test", "captions": []},
            {"video_id": "v3", "split": "test"},
        ),
    )
    m = read_annotations("jsonl", file, video_root=tmp_path / "root", video_ext=".avi")
    assert [r.video_id for r in m] == ["v1", "v2", "v3"] and len(m) == 3
    assert m.get("v1") == VideoRecord(
        "v1", str(tmp_path / "root" / "clips" / "v1.mp4"), "train", ("A dog.", "a cat")
    )
    assert m.get("v2").path == "/abs/v2.webm"
    assert m.get("v3").path == str(tmp_path / "root" / "v3.avi") and m.get("v3").captions == ()
    assert m.splits() == ["train", "test"]
    assert m.references("test") == {"v2": [], "v3": []}
    # without a video_root, relative paths start from the annotation file's folder
    assert read_annotations("jsonl", file).get("v1").path == str(tmp_path / "ann" / "clips" / "v1.mp4")


def test_jsonl_round_trip(tmp_path):
    file = write(
        tmp_path / "a.jsonl",
        jsonl({"video_id": "v1", "video": "v1.mp4", "split": "val", "captions": ["x\u2028y"]}),
    )
    m = read_annotations("jsonl", file, video_root="/videos")
    m.to_jsonl(tmp_path / "out" / "b.jsonl")
    again = read_annotations("jsonl", tmp_path / "out" / "b.jsonl", video_root="/elsewhere")
    assert again.records == m.records


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"video_id": "v9", "split": ', "a.jsonl:2: invalid JSON"),
        ('["v9"]', "a.jsonl: line 2: expected a JSON object"),
        ('{"video_id": "v9", "video": "v9.mp4"}', "a.jsonl: line 2 (video_id 'v9'): missing key 'split'"),
        ('{"video": "v9.mp4", "split": "train"}', "line 2: missing key 'video_id'"),
        ('{"video_id": "v9", "split": "train", "captions": ["ok", 3]}', "line 2 (video_id 'v9') captions[1]"),
        ('{"video_id": "v9", "split": "train", "captions": "one string"}', "expected a list of strings"),
        (
            '{"video_id": "v1", "split": "test"}',
            "line 2 (video_id 'v1'): duplicate video_id (first on line 1)",
        ),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, fragment):
    file = write(tmp_path / "a.jsonl", jsonl({"video_id": "v1", "split": "train"}, line))
    with pytest.raises(AnnotationError) as err:
        read_annotations("jsonl", file)
    assert fragment in str(err.value) and str(file) in str(err.value)


# --- msrvtt --------------------------------------------------------------------------------

MSRVTT = {
    "info": {"year": "2016"},
    "videos": [
        {"video_id": "video0", "split": "train", "category": 9},
        {"video_id": "video1", "split": "validate"},
        {"video_id": "video2", "split": "test"},
    ],
    "sentences": [
        {"video_id": "video0", "caption": "a car drives", "sen_id": 0},
        {"video_id": "video1", "caption": "a man sings", "sen_id": 1},
        {"video_id": "video0", "caption": "cars race", "sen_id": 2},
    ],
}


def test_msrvtt_validate_becomes_val(tmp_path):
    file = write(tmp_path / "videodatainfo.json", MSRVTT)
    m = read_annotations("msrvtt", file, video_root="/data/msrvtt")
    assert [(r.video_id, r.split) for r in m] == [("video0", "train"), ("video1", "val"), ("video2", "test")]
    assert m.get("video0").captions == ("a car drives", "cars race")
    assert m.get("video1").path == "/data/msrvtt/video1.mp4"
    assert m.references("val") == {"video1": ["a man sings"]}
    with pytest.raises(AnnotationError, match="no split 'validate'"):
        m.split("validate")


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d["videos"][1].update(split="dev"), "videos[1] (video_id 'video1'): unknown split 'dev'"),
        (lambda d: d["videos"][2].pop("video_id"), "videos[2]: missing key 'video_id'"),
        (
            lambda d: d["sentences"][1].update(caption=None),
            "sentences[1] (video_id 'video1'): caption must be a string",
        ),
        (
            lambda d: d["sentences"][2].update(video_id="video77"),
            "sentences[2]: video_id 'video77' is not in the videos",
        ),
        (
            lambda d: d["videos"].append({"video_id": "video0", "split": "test"}),
            "videos[3] (video_id 'video0'): duplicate",
        ),
        (lambda d: d.pop("videos"), "top level"),
    ],
)
def test_msrvtt_errors(tmp_path, mutate, fragment):
    data = json.loads(json.dumps(MSRVTT))
    mutate(data)
    file = write(tmp_path / "videodatainfo.json", data)
    with pytest.raises(AnnotationError) as err:
        read_annotations("msrvtt", file)
    assert fragment in str(err.value) and str(file) in str(err.value)


# --- lavis / msvd ----------------------------------------------------------------------------


def lavis_folder(root: Path) -> Path:
    folder = root / "msrvtt" / "annotations"
    write(
        folder / "cap_train.json",
        [
            {"video": "video0.mp4", "caption": "a car drives", "image_id": "video0"},
            {"video": "video3.mp4", "caption": ["a dog", "a puppy"], "image_id": "video3"},
            {"video": "video0.mp4", "caption": "cars race", "image_id": "video0"},
        ],
    )
    # val: integer image ids, our ground-truth name
    write(
        folder / "cap_val.json",
        [{"video": "video1.mp4", "image_id": 1}, {"video": "video4.mp4", "image_id": 4}],
    )
    gt = {"annotations": [{"image_id": 4, "caption": "b", "id": 0}, {"image_id": 1, "caption": "a", "id": 1}]}
    write(folder / "cap_val_gt.json", {**gt, "images": [{"id": 1}, {"id": 4}]})
    # test: no image ids, LAVIS's ground-truth name and place (<cache>/msrvtt_gt/)
    write(folder / "cap_test.json", [{"video": "video2.mp4"}])
    write(
        root / "msrvtt_gt" / "msrvtt_test_gt.json",
        {"annotations": [{"image_id": "video2", "caption": "c", "id": 0}]},
    )
    return folder


def test_lavis_groups_rows_and_joins_ground_truth(tmp_path):
    folder = lavis_folder(tmp_path)
    m = read_annotations("lavis", folder, video_root="/v")
    assert [(r.video_id, r.split) for r in m] == [
        ("video0", "train"), ("video3", "train"), ("video1", "val"), ("video4", "val"), ("video2", "test"),
    ]  # fmt: skip
    assert m.get("video0").captions == ("a car drives", "cars race")
    assert m.get("video3").captions == ("a dog", "a puppy")
    assert m.references("val") == {"video1": ["a"], "video4": ["b"]}
    assert m.references("test") == {"video2": ["c"]}
    assert m.get("video2").path == "/v/video2.mp4"


def test_msvd_reads_lavis_form_with_its_gt_names(tmp_path):
    write(
        tmp_path / "cap_train.json",
        [{"video": "-4wsuPCjDBc_5_15.avi", "caption": "a cat eats", "image_id": 0}],
    )
    write(
        tmp_path / "cap_test.json",
        [{"video": "zzit5b_-ukg_5_20.avi", "caption": "row caption", "image_id": 7}],
    )
    write(
        tmp_path / "msvd_test_gt.json", {"annotations": [{"image_id": 7, "caption": "gt caption", "id": 0}]}
    )
    m = read_annotations("msvd", tmp_path)
    assert m.get("-4wsuPCjDBc_5_15").path == str(tmp_path / "-4wsuPCjDBc_5_15.avi")
    assert m.get("zzit5b_-ukg_5_20").captions == ("gt caption",)  # the ground truth wins over row captions


@pytest.mark.parametrize(
    "file, data, fragment",
    [
        ("cap_train.json", {"video": "x.mp4"}, "cap_train.json: top level: expected a list"),
        (
            "cap_train.json",
            [{"video": "x.mp4", "caption": 5}],
            "cap_train.json: row 0 (video 'x.mp4'): caption must be a string or a list",
        ),
        ("cap_train.json", [{"video": "y.mp4", "caption": ["ok", 5]}], "row 0 (video 'y.mp4') caption[1]"),
        (
            "cap_train.json",
            [{"caption": "hi"}],
            "cap_train.json: row 0 (no \"video\"): missing key 'video_id'",
        ),
        (
            "cap_val_gt.json",
            {"annotations": [{"image_id": 99, "caption": "z"}]},
            "annotations[0] (image_id 99): image_id matches no",
        ),
        (
            "cap_val_gt.json",
            {"annotations": [{"image_id": 1, "caption": ["z"]}]},
            "annotations[0] (image_id 1): caption must be",
        ),
        ("cap_val_gt.json", [], "cap_val_gt.json: top level"),
    ],
)
def test_lavis_errors(tmp_path, file, data, fragment):
    folder = lavis_folder(tmp_path)
    write(folder / file, data)
    with pytest.raises(AnnotationError) as err:
        read_annotations("lavis", folder)
    assert fragment in str(err.value) and str(folder / file) in str(err.value)


def test_lavis_video_in_two_splits_is_a_duplicate(tmp_path):
    folder = lavis_folder(tmp_path)
    write(folder / "cap_test.json", [{"video": "video0.mp4"}])
    (tmp_path / "msrvtt_gt" / "msrvtt_test_gt.json").unlink()
    with pytest.raises(AnnotationError, match=r"duplicate video_id 'video0' .*'train' and 'test'"):
        read_annotations("lavis", folder)


# --- vatex ---------------------------------------------------------------------------------


def test_vatex_split_from_file_name_and_folder(tmp_path):
    write(
        tmp_path / "vatex_validation_v1.0.json",
        [{"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": ["a", "b"], "chCap": ["甲"]}],
    )
    write(tmp_path / "vatex_training_v1.0.json", [{"videoID": "abc123_000010_000020", "enCap": ["c"]}])
    write(tmp_path / "vatex_public_test_english_v1.1.json", [{"videoID": "zzz_000001_000011"}])
    write(tmp_path / "vatex_private_test_without_annotations.json", [{"videoID": "p_000001_000002"}])
    m = read_annotations("vatex", tmp_path, video_root="/vx")
    assert [(r.video_id, r.split) for r in m] == [
        ("abc123_000010_000020", "train"), ("Ptf_2VRj-V0_000122_000132", "val"), ("zzz_000001_000011", "test"),
        ("p_000001_000002", "private_test"),
    ]  # fmt: skip
    assert m.get("Ptf_2VRj-V0_000122_000132").captions == ("a", "b")
    assert m.get("zzz_000001_000011") == VideoRecord(
        "zzz_000001_000011", "/vx/zzz_000001_000011.mp4", "test", ()
    )
    single = read_annotations("vatex", tmp_path / "vatex_training_v1.0.json")
    assert single.splits() == ["train"] and single.get("abc123_000010_000020").path.startswith(str(tmp_path))


@pytest.mark.parametrize(
    "name, data, fragment",
    [
        ("my_vatex.json", [], "cannot tell the split from the file name"),
        ("vatex_training.json", {"videoID": "a"}, "top level: expected a list"),
        (
            "vatex_training.json",
            [{"videoID": "a", "enCap": ["x"]}, {"enCap": []}],
            "row 1: missing key 'videoID'",
        ),
        (
            "vatex_training.json",
            [{"videoID": "a", "enCap": ["x", {"en": 1}]}],
            "row 0 (videoID 'a') enCap[1]",
        ),
    ],
)
def test_vatex_errors(tmp_path, name, data, fragment):
    file = write(tmp_path / name, data)
    with pytest.raises(AnnotationError) as err:
        read_annotations("vatex", file)
    assert fragment in str(err.value) and str(file) in str(err.value)


# --- manifest, missing files, config -------------------------------------------------------


def test_manifest_rejects_duplicate_ids():
    records = [
        VideoRecord("a", "/a.mp4", "train"),
        VideoRecord("b", "/b.mp4", "train"),
        VideoRecord("a", "/c.mp4", "val"),
    ]
    with pytest.raises(AnnotationError, match=r"src.json: duplicate video_id 'a' \(records 0 and 2"):
        Manifest(records, "src.json")


def test_find_missing_videos_reports_per_video(tmp_path):
    (tmp_path / "ok.mp4").write_bytes(b"\x00" * 10)
    (tmp_path / "empty.mp4").touch()
    records = [VideoRecord(v, str(tmp_path / f"{v}.mp4"), "test") for v in ("ok", "empty", "gone")]
    assert find_missing_videos(records) == {
        "empty": f"empty file: {tmp_path / 'empty.mp4'}",
        "gone": f"file not found: {tmp_path / 'gone.mp4'}",
    }


def test_load_manifest_keeps_first_videos_per_split(tmp_path):
    rows = [{"video_id": f"v{i}", "split": "train" if i % 3 else "test"} for i in range(9)]
    file = write(tmp_path / "a.jsonl", jsonl(*rows))
    m = load_manifest(DataConfig(format="jsonl", annotations=str(file), max_videos=2))
    assert [r.video_id for r in m] == ["v0", "v1", "v2", "v3"]  # annotation order kept
    assert len(load_manifest(DataConfig(format="jsonl", annotations=str(file)))) == 9


def test_bad_format_or_path_is_an_annotation_error(tmp_path):
    with pytest.raises(AnnotationError, match="unknown annotation format 'coco'"):
        read_annotations("coco", tmp_path)
    with pytest.raises(AnnotationError, match="annotations not found"):
        read_annotations("jsonl", tmp_path / "nope.jsonl")
    with pytest.raises(AnnotationError, match="no cap_<split>.json files"):
        read_annotations("lavis", tmp_path)


# --- annotation files as they ship -----------------------------------------------------------


def msrvtt_release(folder: Path) -> tuple[Path, Path]:
    """The MSR-VTT 2016 release's two files, in its layout (fields the readers ignore included):
    6 train + 2 validate videos in train_val, 3 test videos in test; 2 captions per video."""

    def video(i: int, split: str) -> dict:
        return {"category": i % 20, "url": f"https://www.youtube.com/watch?v=x{i}", "video_id": f"video{i}",
                "start time": 1.0, "end time": 11.0, "split": split, "id": i}  # fmt: skip

    def sentences(ids, start):
        return [{"caption": f"caption {k} of video{i}", "video_id": f"video{i}", "sen_id": start + 2 * n + k}
                for n, i in enumerate(ids) for k in range(2)]  # fmt: skip

    info = {"contributor": "Microsoft MSM group", "data_created": "2016-04-14 14:30:20", "version": "1.0"}
    train_val = {
        "info": info,
        "videos": [video(i, "train") for i in range(6)] + [video(i, "validate") for i in (6, 7)],
        "sentences": sentences(range(8), 0),
    }
    test = {
        "info": info,
        "videos": [video(i, "test") for i in (8, 9, 10)],
        "sentences": sentences((8, 9, 10), 16),
    }
    return write(folder / "train_val_videodatainfo.json", train_val), write(
        folder / "test_videodatainfo.json", test
    )


def _counts(manifest):
    return {
        s: (len(manifest.split(s)), sum(len(r.captions) for r in manifest.split(s)))
        for s in manifest.splits()
    }


def test_msrvtt_release_as_a_folder_or_a_list_of_its_two_files(tmp_path):
    train_val, test = msrvtt_release(tmp_path / "msrvtt")
    write(tmp_path / "msrvtt" / "category.txt", "music\t0\n")  # shipped beside them; not JSON, ignored
    expected = {"train": (6, 12), "val": (2, 4), "test": (3, 6)}
    for given in (tmp_path / "msrvtt", [str(train_val), str(test)], [str(test), str(train_val)]):
        m = read_annotations("msrvtt", given, video_root="/v")
        assert _counts(m) == expected
        assert m.splits() == ["train", "val", "test"]
        assert m.get("video9") == VideoRecord(
            "video9", "/v/video9.mp4", "test", ("caption 0 of video9", "caption 1 of video9")
        )
    config = DataConfig(format="msrvtt", annotations=[str(train_val), str(test)], video_root="/v")
    assert _counts(load_manifest(config)) == expected
    # one file alone is still read, with only its splits
    assert _counts(read_annotations("msrvtt", train_val)) == {"train": (6, 12), "val": (2, 4)}


def test_msrvtt_video_in_both_files_names_both(tmp_path):
    train_val, test = msrvtt_release(tmp_path)
    data = json.loads(test.read_text())
    data["videos"][0]["video_id"] = "video3"  # also in train_val
    write(test, data)
    with pytest.raises(AnnotationError, match=r"\(video_id 'video3'\): duplicate video_id \(also in ") as err:
        read_annotations("msrvtt", tmp_path)
    assert str(train_val) in str(err.value) and str(test) in str(err.value)


def test_msrvtt_folder_without_its_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnnotationError, match="train_val_videodatainfo.json and test_videodatainfo.json"):
        read_annotations("msrvtt", tmp_path / "empty")


def test_a_list_is_refused_by_formats_that_read_one_file(tmp_path):
    a, b = write(tmp_path / "a.jsonl", "\n"), write(tmp_path / "b.jsonl", "\n")
    with pytest.raises(AnnotationError, match="format 'jsonl' reads one file or folder, got a list"):
        read_annotations("jsonl", [a, b])


def lavis_cache(cache: Path, ds: str, gt_names: str) -> Path:
    """A LAVIS cache: `<cache>/<ds>/annotations/cap_{train,val,test}.json` and the val/test ground
    truth under the paper fork's names (`<ds>_gt/<ds>_<split>_gt.json`) or current LAVIS's
    (`<ds>_cap_gt/<ds>_cap_<split>_annotations.json`). 3 train, 1 val, 2 test videos."""
    folder = cache / ds / "annotations"
    write(folder / "cap_train.json", [{"video": f"{ds}{i}.mp4", "caption": f"train {i} {k}", "image_id": i}
                                      for i in range(3) for k in range(2)])  # fmt: skip
    split_videos = {"val": [3], "test": [4, 5]}
    for split, ids in split_videos.items():
        write(folder / f"cap_{split}.json", [{"video": f"{ds}{i}.mp4", "image_id": i} for i in ids])
        gt = {"annotations": [{"image_id": i, "caption": f"{ds} {split} {i} {k}", "id": 10 * i + k}
                              for i in ids for k in range(3)],
              "images": [{"id": i} for i in ids]}  # fmt: skip
        path = (cache / f"{ds}_gt" / f"{ds}_{split}_gt.json" if gt_names == "fork"
                else cache / f"{ds}_cap_gt" / f"{ds}_cap_{split}_annotations.json")  # fmt: skip
        write(path, gt)
    return folder


@pytest.mark.parametrize("gt_names", ["fork", "current"])
def test_lavis_ground_truth_under_the_forks_and_current_lavis_names(tmp_path, gt_names):
    folder = lavis_cache(tmp_path / "cache", "msvd", gt_names)
    m = read_annotations("msvd", folder)
    assert _counts(m) == {"train": (3, 6), "val": (1, 3), "test": (2, 6)}
    assert m.get("msvd5").captions == ("msvd test 5 0", "msvd test 5 1", "msvd test 5 2")


def test_lavis_shared_cache_takes_the_datasets_own_ground_truth(tmp_path):
    """Both datasets' ground truth in one cache: each folder joins its own, not the first found."""
    lavis_cache(tmp_path / "cache", "msrvtt", "current")
    msvd = lavis_cache(tmp_path / "cache", "msvd", "current")
    assert read_annotations("msvd", msvd).get("msvd4").captions[0] == "msvd test 4 0"
    msrvtt = read_annotations("lavis", tmp_path / "cache" / "msrvtt" / "annotations")
    assert msrvtt.get("msrvtt4").captions[0] == "msrvtt test 4 0"


def test_split_without_references_stops_naming_the_files_searched(tmp_path):
    folder = lavis_cache(tmp_path / "cache", "msvd", "current")
    (tmp_path / "cache" / "msvd_cap_gt" / "msvd_cap_test_annotations.json").unlink()
    m = read_annotations("msvd", folder)
    require_references(m, "val")  # val still has its ground truth
    with pytest.raises(AnnotationError) as err:
        require_references(m, "test")
    message = str(err.value)
    assert "split 'test' has 2 videos but no reference captions" in message
    for searched in ("cap_test_gt.json", "msrvtt_gt/msrvtt_test_gt.json", "msvd_gt/msvd_test_gt.json",
                     "msvd_cap_gt/msvd_cap_test_annotations.json", "cap_test.json"):  # fmt: skip
        assert searched in message


def test_eval_stops_before_captioning_a_split_without_references(tmp_path, monkeypatch):
    rows = [{"video_id": f"v{i}", "split": split, "captions": ["a cap"] if split == "train" else []}
            for i, split in enumerate(["train", "val", "test", "test"])]  # fmt: skip
    annotations = write(tmp_path / "ann.jsonl", jsonl(*rows))
    monkeypatch.setattr(eval_stage, "evaluate_model", lambda *a, **k: pytest.fail("captioning started"))
    monkeypatch.setattr(eval_stage, "require_java", lambda: None)  # not what this test is about
    config = config_from_dict({"run": {"output_dir": str(tmp_path / "run"), "device": "cpu"},
                               "data": {"annotations": str(annotations)}, "eval": {"models": ["zero_shot"]}})  # fmt: skip
    with pytest.raises(AnnotationError, match=rf"split 'test' has 2 videos but no reference captions; looked in: {annotations}"):  # fmt: skip
        eval_stage.run(config)


def test_vatex_file_with_an_explicit_split(tmp_path):
    file = write(tmp_path / "my_vatex.json", [{"videoID": "a_000001_000011", "enCap": ["x", "y"]}])
    with pytest.raises(AnnotationError, match="or set data.annotations_split"):
        read_annotations("vatex", file)
    m = read_annotations("vatex", file, split="val")
    assert [(r.video_id, r.split, r.captions) for r in m] == [("a_000001_000011", "val", ("x", "y"))]
    assert _counts(
        load_manifest(DataConfig(format="vatex", annotations=str(file), annotations_split="test"))
    ) == {"test": (1, 2)}
    with pytest.raises(AnnotationError, match="names the split of one file, not of a folder"):
        read_annotations("vatex", tmp_path, split="val")
    with pytest.raises(AnnotationError, match="applies to format vatex only"):
        read_annotations("msrvtt", file, split="val")


def test_score_with_a_duplicate_id_is_a_one_line_error(tmp_path):
    gts = write(tmp_path / "gts.json", {"annotations": [{"image_id": "v1", "caption": "a dog runs"}]})
    res = write(
        tmp_path / "res.json",
        [{"image_id": "v1", "caption": "a dog"}, {"image_id": "v1", "caption": "a cat"}],
    )
    result = CliRunner().invoke(main, ["score", str(gts), str(res), "--impl", "fast"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"vidcap: error: {res}: record 1: second caption for 'v1'"]
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
