"""Shard reading: the tar reader (good prefix of damaged shards), decoding, bad-sample limits."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from mmdiff.data.shards import (
    BadSampleStats,
    Sample,
    ShardWriter,
    TooManyBadSamples,
    decode_sample,
    iter_raw_samples,
    list_shards,
    read_samples,
    sample_decoder,
)


def png_bytes(color=(255, 0, 0), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def caption_sample(i: int) -> dict:
    return {"png": png_bytes((i * 40 % 256, 0, 0)), "txt": f"caption {i}",
            "json": {"caption": f"caption {i}", "split": "train", "seed": i}}


def write_shard(out_dir: Path, n: int, prefix: str = "shard", start: int = 0,
                max_count: int = 1000) -> list[Path]:
    with ShardWriter(out_dir, prefix=prefix, max_count=max_count) as writer:
        for i in range(start, start + n):
            writer.write(f"k{i:03d}", caption_sample(i))
    return writer.shards


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (header offset, data offset) of every member."""
    import tarfile

    with tarfile.open(path) as tf:
        return {m.name: (m.offset, m.offset_data) for m in tf.getmembers()}


# --------------------------------------------------------------------------- writing / decoding


def test_writer_is_byte_deterministic(tmp_path):
    a = write_shard(tmp_path / "a", 3)[0].read_bytes()
    b = write_shard(tmp_path / "b", 3)[0].read_bytes()
    assert a == b


def test_shapes_style_sample_decodes_all_fields(tmp_path):
    meta = {
        "caption": "a large red circle at the top left",
        "description": "there are 1 shapes. a large red circle at the top left.",
        "qa": [{"question": "what color is the circle?", "answer": "red", "type": "color"}],
        "objects": [{"shape": "circle", "color": "red", "size": "large", "cell": "top left",
                     "bbox": [0, 0, 10, 10]}],
        "split": "train", "seed": 7,
    }
    with ShardWriter(tmp_path) as w:
        w.write("000001", {"png": png_bytes((255, 0, 0), (32, 32)), "txt": meta["caption"], "json": meta})
    stats = BadSampleStats()
    [s] = list(read_samples(tmp_path, stats))
    assert isinstance(s, Sample)
    assert s.key == "000001" and s.shard.endswith("shard-00000.tar")
    assert s.image.mode == "RGB" and s.image.size == (32, 32)
    assert s.image.getpixel((5, 5)) == (255, 0, 0)
    assert s.caption == meta["caption"] and s.captions == [meta["caption"]]
    assert s.description == meta["description"]
    assert s.qa == meta["qa"]
    assert s.meta == {"objects": meta["objects"], "split": "train", "seed": 7}
    assert stats.as_dict() == {"samples": 1, "bad": 0, "bad_reasons": {}, "bad_examples": []}


def test_txt_is_the_caption_only_when_json_has_no_questions():
    stats = BadSampleStats()
    raw = {"__key__": "a", "__url__": "s.tar", "png": png_bytes(), "txt": b"what is it?",
           "json": b'{"qa": [{"question": "what is it?", "answer": "a square"}]}'}
    s = decode_sample(raw, stats)
    assert s.caption is None and s.captions == [] and s.qa[0]["answer"] == "a square"
    raw = {"__key__": "b", "__url__": "s.tar", "png": png_bytes(), "txt": b" a red square \n",
           "json": b'{"description": "long"}'}
    s = decode_sample(raw, stats)
    assert s.caption == "a red square" and s.captions == ["a red square"]
    raw = {"__key__": "c", "__url__": "s.tar", "txt": b"x", "json": b'{"captions": ["one", "two"]}'}
    s = decode_sample(raw, stats)
    assert s.caption == "one" and s.captions == ["one", "two"] and s.image is None
    assert stats.good == 3 and stats.bad == 0


def test_text_only_sample_and_require_image():
    raw = {"__key__": "t", "__url__": "s.tar", "json": b'{"text": "just words"}'}
    stats = BadSampleStats()
    s = decode_sample(raw, stats)
    assert s.image is None and s.text == "just words"
    assert decode_sample(raw, stats, require_image=True) is None
    assert stats.examples == [("t", "s.tar", "missing_image")]


# --------------------------------------------------------------------------- the tar reader


def test_iter_raw_samples_groups_members_by_key(tmp_path):
    shards = write_shard(tmp_path, 5, max_count=2)
    assert len(shards) == 3 and list_shards(tmp_path) == [str(p) for p in shards]
    raws = list(iter_raw_samples(tmp_path))
    assert [r["__key__"] for r in raws] == [f"k{i:03d}" for i in range(5)]
    assert set(raws[0]) == {"__key__", "__url__", "png", "txt", "json"}
    assert raws[2]["__url__"] == str(shards[1])


def _truncated_copy(src: Path, dst: Path, cut: int) -> Path:
    dst.write_bytes(src.read_bytes()[:cut])
    return dst


def test_truncated_tar_yields_good_prefix_and_counts_the_damage(tmp_path):
    [shard] = write_shard(tmp_path / "src", 5)
    header, data = member_offsets(shard)["k003.png"]
    bad = _truncated_copy(shard, tmp_path / "bad.tar", data + 20)  # cut inside k003's image
    [good] = write_shard(tmp_path / "good", 2, start=10)
    stats = BadSampleStats()
    samples = list(read_samples([bad, good], stats))
    assert [s.key for s in samples] == ["k000", "k001", "k002", "k010", "k011"]
    assert stats.good == 5 and stats.bad == 1 and stats.reasons == {"tar_error": 1}
    key, shard_name, reason = stats.examples[0]
    assert key == "k003" and shard_name == str(bad)
    assert reason.startswith("tar_error: ") and "bad.tar" in reason


@pytest.mark.parametrize("where", ["member_boundary", "inside_header"])
def test_tar_cut_anywhere_is_detected(tmp_path, where):
    """tarfile alone stops silently at a cut header or a missing trailer; we must not."""
    [shard] = write_shard(tmp_path / "src", 4)
    header, _ = member_offsets(shard)["k002.json"]
    cut = header if where == "member_boundary" else header + 100
    bad = _truncated_copy(shard, tmp_path / "bad.tar", cut)
    stats = BadSampleStats()
    keys = [r["__key__"] for r in iter_raw_samples([bad], stats)]
    # k001 may have been complete, but nothing proves it: it is reported with the damage
    assert keys == ["k000"]
    assert stats.bad == 1 and stats.examples[0][0] == "k001"
    assert stats.examples[0][2].startswith("tar_error: ")


def test_corrupt_header_in_the_middle_is_detected(tmp_path):
    [shard] = write_shard(tmp_path, 4)
    header, _ = member_offsets(shard)["k002.json"]
    data = bytearray(shard.read_bytes())
    data[header: header + 64] = b"\x7f" * 64
    shard.write_bytes(bytes(data))
    stats = BadSampleStats()
    assert [r["__key__"] for r in iter_raw_samples(shard, stats)] == ["k000"]
    assert "corrupt or truncated tar header" in stats.examples[0][2]


@pytest.mark.parametrize("content", [b"", b"this is not a tar file" * 100])
def test_not_a_tar_and_missing_shard_do_not_crash(tmp_path, content):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(content)
    [good] = write_shard(tmp_path / "good", 1)
    stats = BadSampleStats()
    keys = [r["__key__"] for r in iter_raw_samples([junk, tmp_path / "gone.tar", good], stats)]
    assert keys == ["k000"]
    assert stats.bad == 2 and stats.reasons == {"tar_error": 2}
    assert [e[1] for e in stats.examples] == [str(junk), str(tmp_path / "gone.tar")]


def test_handler_decides_whether_to_go_on(tmp_path):
    [shard] = write_shard(tmp_path / "src", 3)
    bad = _truncated_copy(shard, tmp_path / "bad.tar", member_offsets(shard)["k001.txt"][1] + 1)
    [good] = write_shard(tmp_path / "good", 1, start=5)
    stop = BadSampleStats()
    assert [r["__key__"] for r in iter_raw_samples([bad, good], stop, handler=lambda e: False)] == ["k000"]
    assert stop.bad == 1
    with pytest.raises(Exception, match="tar_error"):
        list(iter_raw_samples([bad, good], BadSampleStats(), handler=wds.reraise_exception))


def test_works_as_a_webdataset_pipeline_stage(tmp_path):
    [shard] = write_shard(tmp_path / "src", 4)
    bad = _truncated_copy(shard, tmp_path / "bad.tar", member_offsets(shard)["k002.png"][1] + 5)
    [good] = write_shard(tmp_path / "good", 2, start=7)
    stats = BadSampleStats()
    raw = list(iter_raw_samples([good], BadSampleStats()))
    raw[1]["png"] = b"broken"
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(bad), str(good)]),
        lambda src: iter_raw_samples(src, stats),
        wds.map(sample_decoder(stats, max_image_side=4)),
        wds.select(lambda s: s is not None),
    )
    samples = list(pipeline)
    assert [s.key for s in samples] == ["k000", "k001", "k007", "k008"]
    assert all(s.image.size == (4, 4) for s in samples)
    assert stats.good == 4 and stats.reasons == {"tar_error": 1}


# --------------------------------------------------------------------------- bad-sample limits


def _mixed_shard(tmp_path: Path, n_good: int, n_bad: int) -> Path:
    with ShardWriter(tmp_path) as w:
        for i in range(n_good):
            w.write(f"g{i:03d}", caption_sample(i))
        for i in range(n_bad):
            w.write(f"x{i:03d}", {"png": b"not an image", "txt": "broken"})
    return tmp_path


def test_max_bad_fraction_stops_with_counts_and_reasons(tmp_path):
    path = _mixed_shard(tmp_path, 5, 5)
    stats = BadSampleStats(max_bad_fraction=0.25, min_seen=4)
    seen = []
    with pytest.raises(TooManyBadSamples) as err:
        for s in read_samples(path, stats):
            seen.append(s.key)
    message = str(err.value)
    # 5 good then bad ones: 2 bad of 7 is the first fraction above 25%
    assert "2 of 7 samples were bad" in message and "max_bad_fraction=25.0%" in message
    assert "image_decode" in message and "key=x001" in message and "shard-00000.tar" in message
    assert len(seen) == 5


def test_final_check_applies_below_min_seen(tmp_path):
    path = _mixed_shard(tmp_path, 1, 1)
    got = []
    with pytest.raises(TooManyBadSamples, match="1 of 2 samples were bad"):
        for s in read_samples(path, max_bad_fraction=0.1):  # default min_seen=100
            got.append(s.key)
    assert got == ["g000"]


def test_default_limit_never_stops_and_counts_everything(tmp_path):
    path = _mixed_shard(tmp_path, 2, 3)
    stats = BadSampleStats()
    assert len(list(read_samples(path, stats))) == 2
    assert (stats.good, stats.bad, dict(stats.reasons)) == (2, 3, {"image_decode": 3})
    assert stats.last[0] == "x002"


def test_stats_validation_and_merge():
    with pytest.raises(ValueError, match="max_bad_fraction"):
        BadSampleStats(max_bad_fraction=1.5)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        read_samples([], max_bad_fraction=2.0, stats=BadSampleStats())
    a, b = BadSampleStats(keep_examples=2), BadSampleStats()
    a.ok()
    a.record("k1", "s1", "image_empty")
    b.record("k2", "s2", "json_invalid: x")
    b.record("k3", "s2", "json_invalid: y")
    a.merge(b)
    assert (a.good, a.bad, a.seen) == (1, 3, 4)
    assert a.reasons == {"image_empty": 1, "json_invalid": 2}
    assert len(a.examples) == 2 and a.last == ("k3", "s2", "json_invalid: y")


def test_read_samples_reports_a_missing_path_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_samples(tmp_path / "nowhere")


def test_duplicate_member_drops_only_that_sample(tmp_path):
    import tarfile

    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in [("a.txt", b"one"), ("b.txt", b"two"), ("b.txt", b"again"),
                           ("b.json", b"{}"), ("c.txt", b"three")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    stats = BadSampleStats()
    assert [s.caption for s in read_samples(path, stats)] == ["one", "three"]
    assert stats.examples == [("b", str(path), "tar_duplicate: b.txt appears twice")]
