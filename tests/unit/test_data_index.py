"""bitcore.data.index: layout rules, rejected files with reasons, class checks, median size."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitcore.data import DatasetError, DatasetIndex, Rejected, Sample, index_directory
from tests.imagegen import class_image, encode, make_archive, make_image_folder


def test_layout_classes_samples_and_labels(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"zebra": 3, "ant": 2, "moth": 4}, fmt="JPEG")
    index = index_directory(tmp_path)
    assert index.root == tmp_path
    assert index.classes == ["ant", "moth", "zebra"]
    assert index.counts() == {"ant": 2, "moth": 4, "zebra": 3}
    assert index.num_images == 9
    assert index.samples[:3] == [
        Sample("ant/ant_000.jpg", 0),
        Sample("ant/ant_001.jpg", 0),
        Sample("moth/moth_000.jpg", 1),
    ]
    assert index.samples[-1] == Sample("zebra/zebra_002.jpg", 2)
    assert index.rejected == []
    assert index.median_size == (40, 48)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP", "GIF"])
def test_every_allowed_format_is_indexed(tmp_path: Path, fmt: str) -> None:
    make_image_folder(tmp_path, {"a": 2, "b": 2}, size=(33, 21), fmt=fmt)
    index = index_directory(tmp_path)
    assert index.num_images == 4 and index.rejected == []
    assert index.median_size == (33, 21)


def test_median_size_is_exact_and_rounds_half_up(tmp_path: Path) -> None:
    # heights 30, 51, 30, 51 -> 40.5 -> 41; widths 41, 60, 41, 60 -> 50.5 -> 51
    make_image_folder(tmp_path, {"a": 2, "b": 2}, size=[(30, 41), (51, 60)])
    assert index_directory(tmp_path).median_size == (41, 51)


def test_median_size_odd_count(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"a": 3, "b": 2}, size=[(10, 90), (20, 80), (70, 5)])
    # heights a: 10, 20, 70; b: 10, 20 -> sorted 10 10 20 20 70; widths 90 80 5 90 80 -> 80
    assert index_directory(tmp_path).median_size == (20, 80)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"a": 2, "b": 2}, size=(40, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 40x48 (h x w) stored image displays as 48x40
    for name in ("a_000.png", "a_001.png"):
        buffer = io.BytesIO()
        class_image(0, 2, (40, 48)).save(buffer, "JPEG", exif=exif)
        (tmp_path / "a" / name).unlink()
        (tmp_path / "a" / name.replace(".png", ".jpg")).write_bytes(buffer.getvalue())
    (tmp_path / "b" / "b_000.png").write_bytes(encode(class_image(1, 2, (48, 40))))
    index = index_directory(tmp_path)
    assert index.median_size == (48, 40)  # 3 of 4 images are 48x40 once oriented


def test_one_top_level_folder_is_descended(tmp_path: Path) -> None:
    make_image_folder(tmp_path, top_level="holiday photos")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "__MACOSX").mkdir()
    index = index_directory(tmp_path)
    assert index.root == tmp_path / "holiday photos"
    assert index.classes == ["cat", "dog"]
    assert index.samples[0] == Sample("cat/cat_000.png", 0)


def test_only_one_top_level_folder_is_descended(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "outer", top_level="inner")
    with pytest.raises(DatasetError) as info:
        index_directory(tmp_path)
    assert info.value.code == "too_few_classes"
    assert info.value.details == {"classes": [{"name": "inner", "count": 0}]}


def test_a_lone_folder_of_images_is_one_class_not_a_wrapper(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"cat": 3})
    with pytest.raises(DatasetError, match="found 1: cat") as info:
        index_directory(tmp_path)
    assert info.value.code == "too_few_classes"


def test_broken_files_are_rejected_with_reasons(tmp_path: Path) -> None:
    make_image_folder(
        tmp_path,
        corrupt={
            "cat/cut.png": "truncated",
            "cat/notes.jpg": "text",
            "dog/zero.png": "empty",
            "dog/garbage.png": "bad_data",
        },
    )
    index = index_directory(tmp_path)
    assert index.counts() == {"cat": 6, "dog": 6}
    assert [(r.path, r.reason) for r in index.rejected] == [
        ("cat/cut.png", "undecodable"),
        ("cat/notes.jpg", "unsupported_format"),
        ("dog/garbage.png", "undecodable"),
        ("dog/zero.png", "empty"),
    ]
    assert "truncated" in index.rejected[0].message
    assert all(not s.path.endswith(("cut.png", "notes.jpg")) for s in index.samples)


def test_oversized_images_are_rejected(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"a": 3, "b": 3}, size=[(40, 48), (40, 48), (50, 50)])
    index = index_directory(tmp_path, max_pixels=40 * 48)
    assert index.counts() == {"a": 2, "b": 2}
    assert [(r.path, r.reason) for r in index.rejected] == [
        ("a/a_002.png", "too_many_pixels"),
        ("b/b_002.png", "too_many_pixels"),
    ]
    assert "2500" in index.rejected[0].message


def test_wrong_depth_symlinks_and_hidden_files(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"a": 2, "b": 2})
    good = encode(class_image(0, 2))
    (tmp_path / "loose.png").write_bytes(good)
    (tmp_path / "a" / "deeper").mkdir()
    (tmp_path / "a" / "deeper" / "x.png").write_bytes(good)
    (tmp_path / "a" / ".hidden.png").write_bytes(b"not even an image")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.png").write_bytes(good)
    (tmp_path / "b" / "__MACOSX").mkdir()
    (tmp_path / "b" / "__MACOSX" / "._b_000.png").write_bytes(b"resource fork")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(good)
    os.symlink(outside, tmp_path / "b" / "link.png")
    os.symlink(tmp_path / "a", tmp_path / "c")
    os.symlink(tmp_path / "a", tmp_path / "b" / "linkdir")

    index = index_directory(tmp_path)
    assert index.classes == ["a", "b"]
    assert index.counts() == {"a": 2, "b": 2}
    assert [(r.path, r.reason) for r in index.rejected] == [
        ("a/deeper/x.png", "nested"),
        ("b/link.png", "symlink"),
        ("b/linkdir", "symlink"),
        ("c", "symlink"),
        ("loose.png", "wrong_depth"),
    ]


def test_too_few_classes(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        index_directory(tmp_path)
    assert info.value.code == "too_few_classes"
    with pytest.raises(DatasetError) as info:
        index_directory(tmp_path / "missing")
    assert info.value.code == "not_a_directory"


def test_too_few_images_lists_the_offending_classes(tmp_path: Path) -> None:
    make_image_folder(
        tmp_path, {"a": 1, "b": 5, "c": 3}, corrupt={"b/x.png": "text", "d/y.png": "text"}
    )
    with pytest.raises(DatasetError) as info:
        index_directory(tmp_path, min_images_per_class=3)
    assert info.value.code == "too_few_images"
    assert info.value.details == {
        "classes": [{"name": "a", "count": 1}, {"name": "d", "count": 0}],
        "min_images_per_class": 3,
    }
    assert "a (1), d (0)" in str(info.value)
    assert index_directory(tmp_path, min_images_per_class=0).counts()["d"] == 0


def test_progress_reports_every_file(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"a": 2, "b": 3}, corrupt={"a/bad.png": "text"})
    calls: list[tuple[int, int]] = []
    index_directory(tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(1, 7)]


def test_save_load_round_trip(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "ds", {"a": 2, "b": 3}, corrupt={"a/bad.png": "truncated"})
    index = index_directory(tmp_path / "ds")
    index.save(tmp_path / "out" / "index.json")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.json"]  # no temp left
    loaded = DatasetIndex.load(tmp_path / "out" / "index.json")
    assert loaded == index
    assert loaded.rejected[0] == Rejected("a/bad.png", "undecodable", index.rejected[0].message)
    document = json.loads((tmp_path / "out" / "index.json").read_text())
    assert document["root"] == str(tmp_path / "ds")
    assert document["median_size"] == [40, 48]
    assert DatasetIndex.from_dict(index.to_dict()) == index
    moved = DatasetIndex.load(tmp_path / "out" / "index.json", root=tmp_path / "elsewhere")
    assert moved.root == tmp_path / "elsewhere" and moved.samples == index.samples
    with pytest.raises(ValueError, match="not a bitserve-dataset-index"):
        DatasetIndex.from_dict({"format": "other"})


def test_fingerprint_tracks_file_changes(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"a": 2, "b": 2})
    index = index_directory(tmp_path)
    before = index.fingerprint()
    assert index_directory(tmp_path).fingerprint() == before
    target = tmp_path / "a" / "a_000.png"
    target.write_bytes(encode(class_image(1, 2, (40, 48), seed=99)))
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    assert index.fingerprint() != before


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archives_from_imagegen_unpack_to_the_same_index(tmp_path: Path, kind: str) -> None:
    folder = make_image_folder(
        tmp_path / "src", {"a": 2, "b": 3}, corrupt={"b/x.png": "text"}, top_level="top"
    )
    archive = make_archive(folder, kind)
    assert archive == tmp_path / f"src.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive) as opened:
            names = opened.namelist()
            opened.extractall(tmp_path / "out")
    else:
        with tarfile.open(archive) as opened:
            names = opened.getnames()
            opened.extractall(tmp_path / "out", filter="data")
    assert "top/a/a_000.png" in names and "top/b/x.png" in names
    original, unpacked = index_directory(folder), index_directory(tmp_path / "out")
    assert unpacked.samples == original.samples and len(original.samples) == 5
    assert unpacked.rejected == original.rejected and unpacked.root == tmp_path / "out" / "top"


def test_imagegen_is_deterministic(tmp_path: Path) -> None:
    first = make_image_folder(tmp_path / "one", {"a": 2, "b": 2}, fmt="JPEG", seed=4)
    second = make_image_folder(tmp_path / "two", {"a": 2, "b": 2}, fmt="JPEG", seed=4)
    other = make_image_folder(tmp_path / "three", {"a": 2, "b": 2}, fmt="JPEG", seed=5)
    name = Path("b") / "b_001.jpg"
    assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / name).read_bytes() != (other / name).read_bytes()


def test_imagegen_classes_are_separable_by_colour(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(8)]
    make_image_folder(tmp_path, dict.fromkeys(names, 4), size=(24, 24), seed=1)
    index = index_directory(tmp_path)
    means = {
        s.path: np.asarray(Image.open(tmp_path / s.path), dtype=np.float64).mean(axis=(0, 1))
        for s in index.samples
    }
    centroids = [
        np.mean([means[s.path] for s in index.samples if s.label == c], axis=0) for c in range(8)
    ]
    for sample in index.samples:
        distances = [np.linalg.norm(means[sample.path] - c) for c in centroids]
        assert int(np.argmin(distances)) == sample.label
