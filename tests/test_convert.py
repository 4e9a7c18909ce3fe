"""Converters (COCO, VQA, LLaVA), img2dataset shards as they are, and ``inspect_shards``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mmdiff.data.convert import ConvertError, convert, convert_coco_captions, convert_llava, convert_vqa
from mmdiff.data.inspect import format_report, inspect_shards
from mmdiff.data.shards import BadSampleStats, ShardWriter, iter_raw_samples, read_samples

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def save_image(path: Path, color, fmt: str, size=(16, 12)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path.read_bytes()


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def read_back(out_dir: Path) -> tuple[list, list[dict]]:
    stats = BadSampleStats()
    samples = list(read_samples(out_dir, stats))
    assert stats.bad == 0, stats.examples
    return samples, list(iter_raw_samples(out_dir))


# --------------------------------------------------------------------------- COCO


@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "images"
    jpg = save_image(images / "a.jpg", RED, "JPEG")
    png = save_image(images / "b.png", GREEN, "PNG")
    save_image(images / "c.bmp", BLUE, "BMP")
    ann = write_json(tmp_path / "captions.json", {
        "images": [
            {"id": 3, "file_name": "c.bmp"},
            {"id": 1, "file_name": "a.jpg", "width": 16, "height": 12},
            {"id": 2, "file_name": "b.png"},
            {"id": 4, "file_name": "gone.jpg"},
            {"id": 5, "file_name": "a.jpg"},  # no captions
        ],
        "annotations": [
            {"image_id": 1, "caption": "A red box. ", "id": 10},
            {"image_id": 2, "caption": "a green box", "id": 11},
            {"image_id": 1, "caption": "red", "id": 12},
            {"image_id": 3, "caption": "a blue box", "id": 13},
            {"image_id": 4, "caption": "lost", "id": 14},
            {"image_id": 99, "caption": "orphan", "id": 15},
        ],
    })
    return tmp_path, ann, images, jpg, png


def test_coco_captions(coco):
    tmp_path, ann, images, jpg, png = coco
    out = tmp_path / "out"
    summary = convert_coco_captions(ann, images, out, samples_per_shard=2)
    assert summary["samples"] == 3 and len(summary["shards"]) == 2
    assert summary["captions"] == 4 and summary["orphan_annotations"] == 1
    assert summary["skipped"] == 2
    assert summary["skipped_reasons"] == {"image_missing": 1, "no_captions": 1}
    assert {"item": "image_id=4", "file": "gone.jpg", "reason": "image_missing"} in summary["skipped_items"]

    samples, raws = read_back(out)
    assert [s.key for s in samples] == ["000000000001", "000000000002", "000000000003"]
    first = samples[0]
    assert first.caption == "A red box." and first.captions == ["A red box.", "red"]
    assert first.meta == {"image_id": 1, "file_name": "a.jpg", "source": "coco", "width": 16, "height": 12}
    assert first.image.size == (16, 12)
    assert all(abs(a - b) <= 3 for a, b in zip(first.image.getpixel((8, 6)), RED))
    # JPEG and PNG keep their original bytes; BMP is re-encoded once as PNG
    assert raws[0]["jpg"] == jpg and raws[0]["txt"] == b"A red box."
    assert raws[1]["png"] == png
    assert "png" in raws[2] and samples[2].image.getpixel((0, 0)) == BLUE


def test_coco_output_is_deterministic_and_protected(coco):
    tmp_path, ann, images, *_ = coco
    a = convert("coco", annotations_json=ann, image_dir=images, out_dir=tmp_path / "a")
    b = convert("coco", annotations_json=ann, image_dir=images, out_dir=tmp_path / "b")
    assert Path(a["shards"][0]).read_bytes() == Path(b["shards"][0]).read_bytes()
    with pytest.raises(ConvertError, match="already holds 1 shard"):
        convert_coco_captions(ann, images, tmp_path / "a")
    assert convert_coco_captions(ann, images, tmp_path / "a", overwrite=True)["samples"] == 3


@pytest.mark.parametrize("content, message", [
    (None, "annotation file not found"),
    ("{oops", "invalid JSON"),
    ([], "top level must be a mapping with key 'images'"),
    ({"images": []}, "missing key 'annotations'"),
    ({"images": {}, "annotations": []}, "images must be a list, got dict"),
    ({"images": [{"id": 1}], "annotations": []}, "images[0] has no key 'file_name'"),
    ({"images": [{"id": "1", "file_name": "a.jpg"}], "annotations": []}, "images[0].id must be int, got str"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": 7}]},
     "annotations[0].caption must be str, got int 7"),
    ({"images": [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}], "annotations": []},
     "images[1].id 1 appears twice"),
])
def test_coco_bad_annotation_file_fails_before_writing(tmp_path, content, message):
    ann = tmp_path / "captions.json"
    if content is not None:
        ann.write_text(content if isinstance(content, str) else json.dumps(content))
    (tmp_path / "images").mkdir()
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as err:
        convert_coco_captions(ann, tmp_path / "images", out)
    assert str(ann) in str(err.value) and message in str(err.value)
    assert not out.exists()


def test_missing_image_dir_fails_before_writing(tmp_path):
    ann = write_json(tmp_path / "c.json", {"images": [], "annotations": []})
    with pytest.raises(ConvertError, match="image directory not found"):
        convert_coco_captions(ann, tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- VQA


def vqa_files(tmp_path: Path, annotations=None) -> tuple[Path, Path]:
    questions = write_json(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"image_id": 1, "question": "what color?", "question_id": 11},
        {"image_id": 2, "question": "how many?", "question_id": 21},
        {"image_id": 1, "question": "is it red?", "question_id": 10},
        {"image_id": 3, "question": "where?", "question_id": 31},
        {"image_id": 2, "question": "unanswered?", "question_id": 22},
    ]})
    annotations = annotations if annotations is not None else [
        {"question_id": 10, "image_id": 1, "multiple_choice_answer": "yes",
         "answers": [{"answer": "yes"}, {"answer": "yes"}], "question_type": "is it",
         "answer_type": "yes/no"},
        {"question_id": 11, "image_id": 1, "multiple_choice_answer": "red",
         "answers": [{"answer": "red"}, {"answer": "dark red"}], "answer_type": "other"},
        {"question_id": 21, "image_id": 2, "multiple_choice_answer": "2",
         "answers": [{"answer": "2"}], "answer_type": "number"},
        {"question_id": 31, "image_id": 3, "multiple_choice_answer": "left", "answers": []},
    ]
    return questions, write_json(tmp_path / "a.json", {"annotations": annotations})


def test_vqa_default_image_names_and_qa_fields(tmp_path):
    images = tmp_path / "images"
    save_image(images / "COCO_val2014_000000000001.jpg", RED, "JPEG")
    save_image(images / "2.png", GREEN, "PNG")  # short names are found too
    questions, annotations = vqa_files(tmp_path)
    summary = convert_vqa(questions, annotations, images, tmp_path / "out")
    assert summary["samples"] == 2 and summary["qa_pairs"] == 3
    assert summary["unanswered_questions"] == 1
    assert summary["skipped_items"] == [
        {"item": "image_id=3", "file": "COCO_val2014_000000000003.jpg", "reason": "image_missing"}]

    samples, raws = read_back(tmp_path / "out")
    one, two = samples
    assert one.caption is None and one.captions == []  # K.txt holds a question, not a caption
    assert raws[0]["txt"] == b"is it red?"
    assert one.qa == [
        {"question": "is it red?", "answer": "yes", "answers": ["yes", "yes"], "type": "yes/no",
         "question_type": "is it", "question_id": 10},
        {"question": "what color?", "answer": "red", "answers": ["red", "dark red"], "type": "other",
         "question_id": 11},
    ]
    assert one.meta == {"image_id": 1, "source": "vqa"}
    assert two.qa[0]["answer"] == "2" and two.image.getpixel((0, 0)) == GREEN


def test_vqa_explicit_pattern(tmp_path):
    images = tmp_path / "images"
    for i, color in [(1, RED), (2, GREEN), (3, BLUE)]:
        save_image(images / f"img_{i:03d}.png", color, "PNG")
    questions, annotations = vqa_files(tmp_path)
    summary = convert_vqa(questions, annotations, images, tmp_path / "out", image_pattern="img_{image_id:03d}.png")
    assert summary["samples"] == 3 and summary["skipped"] == 0
    with pytest.raises(ConvertError, match="image_pattern"):
        convert_vqa(questions, annotations, images, tmp_path / "out2", image_pattern="{imageid}.jpg")


@pytest.mark.parametrize("annotations, message", [
    ([{"question_id": 10, "image_id": 1, "multiple_choice_answer": "yes", "answers": "yes"}],
     "annotations[0].answers must be a list, got str"),
    ([{"question_id": 10, "image_id": 1, "multiple_choice_answer": "yes", "answers": [{"a": 1}]}],
     "annotations[0].answers[0] has no key 'answer'"),
    ([{"question_id": 10, "image_id": 1, "answers": []}], "annotations[0] has no key 'multiple_choice_answer'"),
])
def test_vqa_bad_annotations_fail_before_writing(tmp_path, annotations, message):
    (tmp_path / "images").mkdir()
    questions, ann = vqa_files(tmp_path, annotations)
    with pytest.raises(ConvertError) as err:
        convert_vqa(questions, ann, tmp_path / "images", tmp_path / "out")
    assert str(ann) in str(err.value) and message in str(err.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- LLaVA


def test_llava_pretrain_sets_caption(tmp_path):
    images = tmp_path / "images"
    save_image(images / "00001" / "a.jpg", RED, "JPEG")
    save_image(images / "00001" / "b.png", GREEN, "PNG")
    data = write_json(tmp_path / "pretrain.json", [
        {"id": "GCC_001", "image": "00001/a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image concisely."},
            {"from": "gpt", "value": "a red square"}]},
        {"id": "GCC.002", "image": "00001/b.png", "conversations": [
            {"from": "human", "value": "Give a brief description.\n<image>"},
            {"from": "gpt", "value": "a green square"}]},
    ])
    summary = convert_llava(data, images, tmp_path / "out")
    assert summary["kind"] == "pretrain" and summary["samples"] == 2
    samples, raws = read_back(tmp_path / "out")
    assert [s.key for s in samples] == ["GCC_001", "GCC_002"]
    assert samples[0].caption == "a red square" and samples[1].caption == "a green square"
    assert samples[0].conversations[0]["value"] == "<image>\nDescribe the image concisely."
    assert samples[0].meta == {"id": "GCC_001", "image": "00001/a.jpg", "source": "llava"}
    assert raws[1]["txt"] == b"a green square"


def test_llava_instruct_multi_turn_text_only_and_missing_image(tmp_path):
    images = tmp_path / "images"
    save_image(images / "x.jpg", BLUE, "JPEG")
    convs = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."},
             {"from": "human", "value": "Which color?"}, {"from": "gpt", "value": "Blue."}]
    data = write_json(tmp_path / "instruct.json", [
        {"id": "a", "image": "x.jpg", "conversations": convs},
        {"id": "b", "image": "x.jpg", "conversations": convs[:2]},
        {"id": "c", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]},
        {"id": "d", "image": "missing.jpg", "conversations": convs},
        {"id": 7, "image": None, "conversations": convs[2:]},
    ])
    summary = convert_llava(data, images, tmp_path / "out")
    assert summary["kind"] == "instruct"
    assert (summary["samples"], summary["with_image"], summary["text_only"]) == (4, 2, 2)
    assert summary["skipped_items"] == [{"item": "id=d", "file": "missing.jpg", "reason": "image_missing"}]
    samples, raws = read_back(tmp_path / "out")
    a, b, c, seven = samples
    assert a.conversations == convs and a.caption is None and a.image.size == (16, 12)
    assert raws[0]["txt"] == b"What is it?"
    assert b.caption is None  # instruct single-turn answers are answers, not captions
    assert c.image is None and c.text == "Say hi\n\nhi" and c.conversations[1]["value"] == "hi"
    assert seven.key == "7" and seven.text == "Which color?\n\nBlue."
    # forcing pretrain turns single-turn answers into captions
    forced = convert_llava(data, images, tmp_path / "forced", kind="pretrain")
    assert forced["kind"] == "pretrain"
    assert [s.caption for s in read_samples(tmp_path / "forced")] == [None, "A square.", None, None]


@pytest.mark.parametrize("records, message", [
    ({"id": 1}, "top level must be a list, got dict"),
    ([{"id": 1, "image": "a.jpg"}], "[0] has no key 'conversations'"),
    ([{"id": 1, "conversations": []}], "[0].conversations is empty"),
    ([{"id": 1, "image": ["a.jpg"], "conversations": [{"from": "human", "value": "x"}]}],
     "[0].image must be str, got list"),
    ([{"id": 1, "conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}],
     "[0].conversations[1].from must be 'human' or 'gpt', got 'bot'"),
])
def test_llava_bad_file_fails_before_writing(tmp_path, records, message):
    (tmp_path / "images").mkdir()
    data = write_json(tmp_path / "llava.json", records)
    with pytest.raises(ConvertError) as err:
        convert_llava(data, tmp_path / "images", tmp_path / "out")
    assert str(data) in str(err.value) and message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_convert_dispatch_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'cc3m'.*coco"):
        convert("cc3m", out_dir=tmp_path)


# --------------------------------------------------------------------------- img2dataset


def test_img2dataset_shard_decodes_as_is(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), RED).save(buf, format="JPEG")
    meta = {"url": "http://example.com/cat.jpg", "key": "000000001", "status": "success",
            "error_message": None, "width": 20, "height": 10, "original_width": 640,
            "original_height": 320, "exif": "{}", "sha256": "ab" * 32, "caption": "a red cat"}
    with ShardWriter(tmp_path, prefix="00000", max_count=10) as w:
        w.write("000000001", {"jpg": buf.getvalue(), "txt": "a red cat", "json": meta})
    [s] = list(read_samples(tmp_path))
    assert s.key == "000000001" and s.caption == "a red cat" and s.captions == ["a red cat"]
    assert s.image.mode == "RGB" and s.image.size == (20, 10)
    assert s.meta["url"] == meta["url"] and s.meta["status"] == "success"
    assert s.meta["original_width"] == 640 and "caption" not in s.meta


# --------------------------------------------------------------------------- inspect


def test_inspect_counts_good_bad_and_tasks(tmp_path):
    img = io.BytesIO()
    Image.new("RGB", (4, 4), RED).save(img, format="PNG")
    png = img.getvalue()
    shards = tmp_path / "shards"
    with ShardWriter(shards, max_count=3) as w:
        w.write("cap", {"png": png, "txt": "a red box", "json": {"description": "one red box."}})
        w.write("vqa", {"png": png, "txt": "what?", "json": {"qa": [{"question": "what?", "answer": "box"}]}})
        w.write("txt", {"json": {"text": "no image here"}})
        w.write("bad1", {"png": b"junk", "txt": "x"})
        w.write("bad2", {"png": png, "json": "[]"})
        w.write("conv", {"json": {"conversations": [{"from": "human", "value": "hi"}]}})
    report = inspect_shards(shards)
    assert report["shards"] == 2 and report["samples"] == 4 and report["bad"] == 2
    assert report["bad_reasons"] == {"image_decode": 1, "json_shape": 1}
    assert report["tasks"] == {"caption": 1, "vqa": 1, "describe": 1, "conversation": 1, "text": 1, "t2i": 1}
    assert (report["with_image"], report["text_only"]) == (2, 2)
    assert [e["key"] for e in report["bad_examples"]] == ["bad1", "bad2"]
    assert json.loads(json.dumps(report)) == report
    text = format_report(report)
    assert "4 good" in text and "image_decode=1" in text and "bad1" in text


def test_inspect_reports_a_truncated_shard(tmp_path, coco):
    _, ann, images, *_ = coco
    summary = convert_coco_captions(ann, images, tmp_path / "out", samples_per_shard=2)
    last = Path(summary["shards"][-1])
    last.write_bytes(last.read_bytes()[:700])  # cut inside the first member's data
    report = inspect_shards(tmp_path / "out")
    assert report["samples"] == 2 and report["bad"] == 1
    assert report["bad_reasons"] == {"tar_error": 1}
    assert report["bad_examples"][0]["shard"] == str(last)


def test_vqa_skips_inconsistent_and_empty_pairs(tmp_path):
    images = tmp_path / "images"
    save_image(images / "1.jpg", RED, "JPEG")
    questions, annotations = vqa_files(tmp_path, [
        {"question_id": 10, "image_id": 1, "multiple_choice_answer": "yes", "answers": []},
        {"question_id": 11, "image_id": 1, "multiple_choice_answer": "  ", "answers": []},
        {"question_id": 21, "image_id": 1, "multiple_choice_answer": "2", "answers": []},
    ])
    summary = convert_vqa(questions, annotations, images, tmp_path / "out")
    assert summary["samples"] == 1 and summary["qa_pairs"] == 1
    assert summary["skipped_reasons"] == {"empty_qa": 1, "image_mismatch": 1}
    assert summary["unanswered_questions"] == 2  # 22 and 31: images 2 and 3 get no sample
    [s] = read_samples(tmp_path / "out")
    assert [p["question"] for p in s.qa] == ["is it red?"]
