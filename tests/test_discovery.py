"""Input discovery: directories, globs, files and stdin to a sorted, de-duplicated path list."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from dinoreg.errors import InputError
from dinoreg.inputs.discover import IMAGE_SUFFIXES, Discovery, discover, find_inputs


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
    stdin = io.StringIO("photos/b.jpg\n\n   \nphotos/sub\r\nphotos/f.gif\n")
    assert discover(["-", "photos/e.bmp"], stdin=stdin) == [
        "photos/b.jpg",
        "photos/e.bmp",
        "photos/f.gif",
        "photos/sub/c.JPeG",
        "photos/sub/deeper/d.webp",
    ]


def test_stdin_lines_are_literal_paths_never_globs(tree: Path) -> None:
    touch_image(tree / "photos" / "x[1].jpg")
    stdin = io.StringIO("photos/*.gif\nphotos/x[1].jpg\nphotos/b.jpg\n")
    found = find_inputs(["-"], stdin=stdin)
    assert found.paths == ["photos/b.jpg", "photos/x[1].jpg"]  # f.gif was never listed
    assert found.missing == [("photos/*.gif", "no such file")]


def test_missing_path_with_glob_characters_is_named(tree: Path) -> None:
    found = find_inputs(["photos/b.jpg", "photo [final].jpg", "photos/*.none"])
    assert found.paths == ["photos/b.jpg"]
    assert found.missing == [
        ("photo [final].jpg", "no such file or matching image file"),
        ("photos/*.none", "no such file or matching image file"),
    ]
    # The list form keeps them, so decoding fails each one by name ("no such file").
    assert discover(["photos/b.jpg", "photo [final].jpg"]) == ["photo [final].jpg", "photos/b.jpg"]


def test_existing_name_with_glob_characters_is_taken_literally(tree: Path) -> None:
    touch_image(tree / "photos" / "[ab].jpg")  # as a glob it would match a.jpg or b.jpg
    assert find_inputs(["photos/[ab].jpg"]) == Discovery(["photos/[ab].jpg"], [])


def test_unreadable_sub_folder_is_reported(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tree / "photos" / "locked"
    touch_image(locked / "x.jpg")
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads any folder: refuse it the way the kernel would
        scandir = os.scandir

        def refuse(path):
            if os.path.basename(os.fspath(path)) == "locked":
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return scandir(path)

        monkeypatch.setattr(os, "scandir", refuse)
    try:
        found = find_inputs(["photos"])
    finally:
        locked.chmod(0o755)
    assert "photos/b.jpg" in found.paths
    assert found.missing == [("photos/locked", "cannot list directory (Permission denied)")]


def test_nul_byte_on_stdin_is_a_named_bad_line(tree: Path) -> None:
    stdin = io.StringIO("photos/b.jpg\nphotos/bad\0name.jpg\n")
    found = find_inputs(["-"], stdin=stdin)
    assert found.paths == ["photos/b.jpg"]
    assert found.missing == [
        ("stdin line 2: photos/bad\\0name.jpg", "a path cannot contain a NUL byte")
    ]
    with pytest.raises(InputError, match="stdin line 2"):
        discover(["-"], stdin=io.StringIO("photos/b.jpg\nphotos/bad\0name.jpg\n"))


def test_non_utf8_names_survive_from_walks_and_stdin(tree: Path) -> None:
    raw = os.fsencode(str(tree / "photos")) + b"/caf\xe9.jpg"
    with open(raw, "wb"):
        pass
    name = os.fsdecode(raw)  # surrogateescape: opens the same file again
    assert "photos/" + os.path.basename(name) in discover(["photos"])
    stdin = io.TextIOWrapper(io.BytesIO(raw + b"\n"), encoding="utf-8")
    assert find_inputs(["-"], stdin=stdin).paths == [name]
    assert os.path.exists(name)


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
    for part in (
        "nope/",
        "photos/*.png (no such file or",
        "empty (a directory",
        "gone.jpg",
        "stdin",
    ):
        assert part in message
    assert ".jpg" in message  # says which suffixes count


def test_no_inputs_at_all() -> None:
    with pytest.raises(InputError, match="no inputs were given"):
        discover([])


def test_brace_arguments_expand_like_a_shell_and_then_glob(tree: Path) -> None:
    found = find_inputs(["photos/{b,e}.{jpg,bmp}"])
    assert found.paths == ["photos/b.jpg", "photos/e.bmp"]
    assert found.missing == [("photos/b.bmp", "no such file"), ("photos/e.jpg", "no such file")]
    assert discover(["photos/{b,f}.*"]) == ["photos/b.jpg", "photos/f.gif"]
    found = find_inputs(["photos/{b,zz}.jpg"])
    assert found == Discovery(["photos/b.jpg"], [("photos/zz.jpg", "no such file")])
    touch_image(tree / "photos" / "{b,e}.jpg")  # a file of that very name is taken literally
    assert discover(["photos/{b,e}.jpg"]) == ["photos/{b,e}.jpg"]
    stdin = io.StringIO("photos/{b,f}.jpg\nphotos/{b,e}.jpg\n")  # stdin lines stay literal
    assert find_inputs(["-"], stdin=stdin) == Discovery(
        ["photos/{b,e}.jpg"], [("photos/{b,f}.jpg", "no such file")]
    )
