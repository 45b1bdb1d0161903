"""VTAB-1k folder verification (data/verify_vtab.py): a valid tree passes, every planted defect is named."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import verify_vtab
from data.verify_vtab import verify_root, verify_task

SMALL = {"train800": 8, "val200": 2}
SMALL_EXPECTED = {"train800": 8, "val200": 2, "train800val200": 10}


@pytest.fixture
def small(tmp_path, make_vtab_task) -> Path:
    """A valid small cifar task folder (8 / 2 / 10 / 5)."""
    return make_vtab_task(tmp_path, "cifar", SMALL, test_size=5)


def check(task_dir: Path, **kwargs):
    return verify_task(task_dir, expected_sizes=SMALL_EXPECTED, **kwargs)


def edit_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_full_size_tree_passes_then_size_defect_is_named(tmp_path, make_vtab_task, capsys):
    task_dir = make_vtab_task(tmp_path / "vtab", "cifar100", test_size=3, num_classes=100, image_size=2)
    report = verify_task(task_dir)
    assert report.ok, report.problems
    assert report.task == "cifar" and report.num_classes == 100
    assert {s: st.count for s, st in report.splits.items()} == {"train800": 800, "val200": 200,
                                                                "train800val200": 1000, "test": 3}
    assert report.splits["train800"].label_histogram == {label: 8 for label in range(100)}
    assert any("test split has 10000" in w for w in report.warnings)

    manifest = tmp_path / "out" / "manifest.json"
    assert verify_vtab.main([str(tmp_path / "vtab"), "--tasks", "cifar", "--manifest", str(manifest)]) == 0
    assert "1/1 task(s) ok; 0 problem(s)" in capsys.readouterr().out
    data = json.loads(manifest.read_text())
    entry = data["tasks"]["cifar"]
    assert entry["ok"] and entry["splits"]["val200"]["count"] == 200
    assert entry["splits"]["val200"]["label_histogram"] == {str(label): 2 for label in range(100)}
    assert all(len(entry["splits"][s][k]) == 64 for s in entry["splits"] for k in ("list_sha256", "images_sha256"))

    # Same images, same checksum; a changed image changes only its split's aggregate.
    (task_dir / "images" / "test" / "000001.png").write_bytes((task_dir / "images" / "test" / "000000.png")
                                                             .read_bytes())
    again = verify_task(task_dir)
    assert again.splits["train800"].images_sha256 == report.splits["train800"].images_sha256
    assert again.splits["test"].images_sha256 != report.splits["test"].images_sha256

    edit_line(task_dir / "train800.txt", 800, "")
    report = verify_task(task_dir)
    assert f"{task_dir / 'train800.txt'}: 799 entries, expected 800" in report.problems
    assert any(p.startswith(f"{task_dir / 'train800val200.txt'}:800:") and "not in train800.txt" in p
               for p in report.problems)
    assert verify_vtab.main([str(tmp_path / "vtab"), "--tasks", "cifar"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "799 entries, expected 800" in out


def test_small_valid_tree(small):
    report = check(small)
    assert report.ok and report.problems == []


def test_missing_list_file(small):
    os.remove(small / "val200.txt")
    report = check(small)
    assert f"missing list file: {small / 'val200.txt'}" in report.problems


def test_wrong_split_size(small):
    path = small / "test.txt"
    path.write_text("")
    assert f"{path}: split is empty" in check(small).problems
    report = verify_task(small)  # default VTAB sizes
    assert f"{small / 'train800.txt'}: 8 entries, expected 800" in report.problems
    assert f"{small / 'val200.txt'}: 2 entries, expected 200" in report.problems
    assert f"{small / 'train800val200.txt'}: 10 entries, expected 1000" in report.problems


def test_label_out_of_range(small):
    edit_line(small / "train800.txt", 3, "images/train800/000002.png 100")
    edit_line(small / "train800val200.txt", 3, "images/train800/000002.png 100")
    edit_line(small / "test.txt", 2, "images/test/000001.png -4")
    problems = check(small).problems
    assert f"{small / 'train800.txt'}:3: label 100 outside [0, 100) for cifar (100 classes)" in problems
    assert f"{small / 'train800val200.txt'}:3: label 100 outside [0, 100) for cifar (100 classes)" in problems
    assert f"{small / 'test.txt'}:2: label -4 outside [0, 100) for cifar (100 classes)" in problems
    assert len(problems) == 3


def test_missing_image(small):
    missing = small / "images" / "val200" / "000001.png"
    os.remove(missing)
    problems = check(small).problems
    assert f"{small / 'val200.txt'}:2: missing image {missing}" in problems
    assert f"{small / 'train800val200.txt'}:10: missing image {missing}" in problems


@pytest.mark.parametrize("content", [b"", b"garbage bytes", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR broken"])
def test_corrupt_image(small, content):
    bad = small / "images" / "test" / "000003.png"
    bad.write_bytes(content)
    problems = check(small).problems
    assert len(problems) == 1 and problems[0].startswith(f"{small / 'test.txt'}:4: unreadable image {bad}: ")


def test_truncated_jpeg_needs_deep(small):
    """PIL's verify() does not decode JPEG data, so a cut-off JPEG is only caught by --deep."""
    bad = small / "images" / "train800" / "000001.png"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    bad.write_bytes(buffer.getvalue()[:-500])  # headers intact, entropy-coded data cut short
    shallow = check(small)
    assert shallow.ok, shallow.problems
    deep = check(small, deep=True).problems
    assert any(p.startswith(f"{small / 'train800.txt'}:2: unreadable image {bad}: OSError") for p in deep)
    assert any(p.startswith(f"{small / 'train800val200.txt'}:2: unreadable image {bad}") for p in deep)
    assert verify_vtab.main([str(small.parent), "--tasks", "cifar", "--deep"]) == 1


def test_malformed_lines(small):
    path = small / "val200.txt"
    path.write_text("images/val200/000000.png 0\nimages/val200/000001.png one\njust-a-path\n")
    problems = check(small).problems
    assert f"{path}:2: malformed line 'images/val200/000001.png one': label 'one' is not an integer" in problems
    assert f"{path}:3: malformed line 'just-a-path': expected '<relative path> <integer label>'" in problems
    assert f"{path}: 1 entries, expected 2" in problems


def test_train800val200_must_equal_union(small):
    tv = small / "train800val200.txt"
    edit_line(tv, 9, "images/test/000000.png 0")          # a test image instead of val200 line 1
    edit_line(tv, 2, "images/train800/000001.png 7")      # label differs from train800 line 2
    problems = check(small).problems
    assert f"{tv}:9: 'images/test/000000.png 0' is not in train800.txt or val200.txt " \
           "(train800val200 must equal train800 + val200)" in problems
    assert any(p.startswith(f"{tv}:2: 'images/train800/000001.png 7' is not in") for p in problems)
    assert f"{small / 'val200.txt'}:1: 'images/val200/000000.png 0' is missing from {tv} " \
           "(train800val200 must equal train800 + val200)" in problems
    assert any(p.startswith(f"{small / 'train800.txt'}:2: 'images/train800/000001.png 1' is missing") for p in problems)
    assert any(f"{small / 'test.txt'}:1: images/test/000000.png is also listed in {tv}:9" in p for p in problems)


def test_union_compares_content_not_paths(small):
    """A zip whose train800val200 points at copies of the train800/val200 images still passes."""
    copies = small / "images" / "trainval"
    copies.mkdir()
    lines = []
    for i, line in enumerate((small / "train800val200.txt").read_text().splitlines()):
        rel, label = line.split()
        (copies / f"{i}.png").write_bytes((small / rel).read_bytes())
        lines.append(f"images/trainval/{i}.png {label}")
    (small / "train800val200.txt").write_text("\n".join(lines) + "\n")
    assert check(small).ok


def test_duplicates_and_overlaps(small):
    edit_line(small / "train800.txt", 5, "images/train800/000000.png 0")
    edit_line(small / "train800val200.txt", 5, "images/train800/000000.png 0")
    edit_line(small / "val200.txt", 2, "images/train800/000007.png 7")
    edit_line(small / "train800val200.txt", 10, "images/train800/000007.png 7")
    problems = check(small).problems
    assert f"{small / 'train800.txt'}:5: duplicate entry images/train800/000000.png (first at line 1)" in problems
    assert any(p.startswith(f"{small / 'val200.txt'}:2: images/train800/000007.png is also listed in "
                            f"{small / 'train800.txt'}:8") for p in problems)


def test_identical_images_in_train_and_test_warn(small):
    (small / "images" / "test" / "000000.png").write_bytes((small / "images" / "val200" / "000000.png").read_bytes())
    report = check(small)
    assert report.ok and any("1 image(s) in train800val200 have byte-identical copies in test" in w
                             for w in report.warnings)


def test_every_problem_is_named_at_once(small, capsys):
    os.remove(small / "val200.txt")
    edit_line(small / "test.txt", 1, "images/test/000000.png 999")
    edit_line(small / "test.txt", 2, "broken")
    os.remove(small / "images" / "test" / "000002.png")
    (small / "images" / "test" / "000003.png").write_bytes(b"junk")
    problems = check(small).problems
    assert len(problems) == 5, problems
    assert verify_vtab.main([str(small)]) == 1  # a task folder given directly
    out = capsys.readouterr().out
    assert out.count("PROBLEM") >= 5
    for fragment in ("missing list file", "label 999", "malformed line 'broken'", "missing image", "unreadable image"):
        assert fragment in out


def test_root_with_other_spelling_and_missing_tasks(tmp_path, make_vtab_task):
    make_vtab_task(tmp_path, "oxford_pet", SMALL, num_classes=37)
    reports = verify_root(tmp_path, ["oxford_iiit_pet", "dtd"])
    assert [r.task for r in reports] == ["oxford_iiit_pet", "dtd"]
    assert reports[0].num_classes == 37 and reports[0].task_dir == str(tmp_path / "oxford_pet")
    assert all("expected 800" in p or "expected 200" in p or "expected 1000" in p for p in reports[0].problems)
    assert len(reports[1].problems) == 1 and "task folder not found" in reports[1].problems[0]
    assert str(tmp_path / "dtd") in reports[1].problems[0]
    assert len(verify_root(tmp_path)) == 19  # default: every VTAB task


def test_custom_task_labels(tmp_path, make_vtab_task):
    task_dir = make_vtab_task(tmp_path, "mine", SMALL, num_classes=3)
    report = check(task_dir)
    assert report.ok and report.num_classes is None and any("unknown task" in w for w in report.warnings)
    (task_dir / "classes.txt").write_text("a\nb\n")
    report = check(task_dir)
    assert report.num_classes == 2
    assert f"{task_dir / 'train800.txt'}:3: label 2 outside [0, 2) for mine (2 classes)" in report.problems
