"""Input discovery: directories, globs, files and stdin to a sorted, de-duplicated path list."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from dinoreg.errors import InputError
from dinoreg.inputs.discover import IMAGE_SUFFIXES, discover


def touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # discovery never opens files: names are all that count
    return path


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """photos/ with nested, mixed-case, hidden and non-image entries; cwd is tmp_path."""
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    touch_image(photos / "b.jpg")
    touch_image(photos / "A.PNG")
    touch_image(photos / "sub" / "c.JPeG")
    touch_image(photos / "sub" / "deeper" / "d.webp")
    touch_image(photos / "e.bmp")
    touch_image(photos / "f.gif")
    touch_image(photos / "g.TIFF")
    touch_image(photos / ".hidden.jpg")
    touch_image(photos / ".cache" / "h.jpg")
    (photos / "notes.txt").write_text("not an image")
    return tmp_path


def test_suffixes() -> None:
    expected = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    assert expected == IMAGE_SUFFIXES


def test_directories_are_walked_recursively_sorted_and_as_given(tree: Path) -> None:
    assert discover(["photos"]) == [
        "photos/A.PNG",
        "photos/b.jpg",
        "photos/e.bmp",
        "photos/f.gif",
        "photos/g.TIFF",
        "photos/sub/c.JPeG",
        "photos/sub/deeper/d.webp",
    ]
    assert discover(["./photos/sub/"])[0] == "./photos/sub/c.JPeG"


def test_explicit_hidden_and_non_image_files_are_kept(tree: Path) -> None:
    assert discover(["photos/.hidden.jpg", "photos/notes.txt"]) == [
        "photos/.hidden.jpg",
        "photos/notes.txt",
    ]


def test_duplicates_keep_the_first_spelling(tree: Path) -> None:
    (tree / "photos" / "link.jpg").symlink_to(tree / "photos" / "b.jpg")
    got = discover(["photos/sub/c.JPeG", "photos", "./photos/b.jpg", str(tree / "photos")])
    assert got.count("photos/b.jpg") == 1
    assert "photos/link.jpg" not in got  # same real file as photos/b.jpg, seen first
    assert "photos/sub/c.JPeG" in got and len(got) == 7
    assert got == sorted(got)


def test_symlinked_dirs_are_followed_and_loops_are_safe(tmp_path: Path) -> None:
    root = tmp_path / "root"
    touch_image(root / "a" / "x.jpg")
    (root / "a" / "up").symlink_to(root, target_is_directory=True)  # a loop back to the top
    elsewhere = tmp_path / "elsewhere"
    touch_image(elsewhere / "y.png")
    (root / "other").symlink_to(elsewhere, target_is_directory=True)
    got = discover([str(root)])
    assert got == [str(root / "a" / "x.jpg"), str(root / "other" / "y.png")]


def test_dangling_symlink_found_while_walking_is_kept(tmp_path: Path) -> None:
    touch_image(tmp_path / "ok.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    got = discover([str(tmp_path)])
    assert got == [str(tmp_path / "gone.jpg"), str(tmp_path / "ok.jpg")]


def test_globs(tree: Path) -> None:
    assert discover(["photos/*.jpg"]) == ["photos/b.jpg"]
    assert discover(["photos/**/*.webp"]) == ["photos/sub/deeper/d.webp"]
    assert discover(["photos/?.gif"]) == ["photos/f.gif"]
    # A glob is a way to pick images: notes.txt is left out, matched folders are walked.
    got = discover(["photos/*"])
    assert "photos/notes.txt" not in got and "photos/sub/deeper/d.webp" in got
    assert not any("/." in p for p in got)


def test_stdin_paths(tree: Path) -> None:
    stdin = io.StringIO("photos/b.jpg\n\n   \nphotos/sub\r\nphotos/*.gif\n")
    assert discover(["-", "photos/e.bmp"], stdin=stdin) == [
        "photos/b.jpg",
        "photos/e.bmp",
        "photos/f.gif",
        "photos/sub/c.JPeG",
        "photos/sub/deeper/d.webp",
    ]


def test_missing_explicit_file_is_kept_for_the_failure_report(tree: Path) -> None:
    assert discover(["photos/b.jpg", "photos/missing.jpg"]) == [
        "photos/b.jpg",
        "photos/missing.jpg",
    ]


def test_nothing_found_names_what_was_searched(tree: Path) -> None:
    (tree / "empty").mkdir()
    with pytest.raises(InputError) as info:
        discover(["nope/", "photos/*.png", "empty", "gone.jpg", "-"], stdin=io.StringIO("\n"))
    message = str(info.value)
    assert message.startswith("No images found in ")
    for part in ("nope/", "photos/*.png (pattern", "empty (a directory", "gone.jpg", "stdin"):
        assert part in message
    assert ".jpg" in message  # says which suffixes count


def test_no_inputs_at_all() -> None:
    with pytest.raises(InputError, match="no inputs were given"):
        discover([])
