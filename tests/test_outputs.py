"""Output paths: only a regular file (or a new name) is ever replaced, a symlink is written
through to its target, and anything else (folder, device, FIFO, socket, a folder that cannot
be written) is refused in one line before any work, leaving it as it was."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from recycle.errors import RecycleError
from recycle.files import atomic_path, output_target, replace_dir, write_text
from tests.conftest import cli, one_line_error


def _special(tmp_path, kind):
    p = tmp_path / kind
    if kind == "folder":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    return p


@pytest.mark.parametrize("kind, words", [("folder", "it is a folder"), ("fifo", "it is a FIFO"),
                                         ("socket", "it is a socket")])
def test_anything_but_a_regular_file_is_refused(tmp_path, kind, words):
    p = _special(tmp_path, kind)
    before = os.lstat(p)
    with pytest.raises(RecycleError, match=words):
        write_text(p, "x")
    after = os.lstat(p)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert sorted(x.name for x in tmp_path.iterdir()) == [kind]  # no temporary left


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full", "/dev/zero"])
def test_devices_are_never_replaced(device, tmp_path):
    if not os.path.exists(device):
        pytest.skip(f"no {device} here")
    st = os.stat(device)
    with pytest.raises(RecycleError, match="it is a character device, not a regular file"):
        output_target(device)
    with pytest.raises(RecycleError, match="character device"):
        with atomic_path(device) as tmp:  # refused before a temporary exists
            raise AssertionError(f"got {tmp}")
    link = tmp_path / "out.png"
    link.symlink_to(device)  # a link to a device is the device
    with pytest.raises(RecycleError, match=f"a link to {device}.*character device"):
        write_text(link, "x")
    assert stat.S_ISCHR(os.stat(device).st_mode) and os.stat(device).st_ino == st.st_ino


def test_a_symlink_is_written_through_to_its_target(tmp_path):
    real = tmp_path / "real" / "out.jsonl"
    real.parent.mkdir()
    real.write_text("old\n")
    real.chmod(0o640)
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    chain = tmp_path / "chain.jsonl"
    chain.symlink_to(link)
    write_text(chain, "new\n")
    assert chain.is_symlink() and link.is_symlink()  # the links stay links
    assert real.read_text() == "new\n" and stat.S_IMODE(real.stat().st_mode) == 0o640  # permissions kept
    assert sorted(p.name for p in real.parent.iterdir()) == ["out.jsonl"]  # the temporary was beside the target
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "real" / "new.jsonl")
    write_text(dangling, "made\n")
    assert (tmp_path / "real" / "new.jsonl").read_text() == "made\n" and dangling.is_symlink()


def test_unwritable_or_missing_folders_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for path, words in [(tmp_path / "file" / "out.png", "Not a directory"),
                        (tmp_path / "nowhere" / "out.png", "does not exist"),
                        ("/proc/out.png", "cannot write /proc/out.png")]:
        with pytest.raises(RecycleError, match=words) as e:
            write_text(path, "x", make_parents=False)
        assert "Error" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RecycleError, match="Not a directory"):
        write_text(tmp_path / "file" / "sub" / "out.png", "x")
    with pytest.raises(RecycleError, match="a file or link of that name is in the way"):
        replace_dir(lambda tmp: None, tmp_path / "file")
    with pytest.raises(RecycleError, match="cannot write"):
        replace_dir(lambda tmp: None, "/proc/adapter")


def test_a_failed_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("old")
    with pytest.raises(RecycleError, match="No space left"):
        with atomic_path(p) as tmp:
            tmp.write_text("partial")
            raise OSError(28, "No space left on device")
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["out.txt"]


def test_predict_output_is_checked_before_any_work(world, library, tmp_path):
    for spec in world["specs"].values():
        assert cli("add-task", spec).exit_code == 0
    assert cli("add-expert", library["a"], "--task", "t_alpha", "--base", "tiny-llama").exit_code == 0
    fifo = _special(tmp_path, "fifo")
    for out, words in [(fifo, "it is a FIFO, not a regular file"), ("/dev/null", "character device"),
                       (tmp_path / "no" / "x.jsonl", "does not exist"), ("/proc/x.jsonl", "cannot write")]:
        err = one_line_error(cli("predict", "uniform", "--prompt", "x", "--choices", "a,b", "--output", out))
        assert words in err and "Error:" in err and "FileNotFoundError" not in err and "PermissionError" not in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    real = tmp_path / "answers.jsonl"
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    assert cli("predict", "uniform", "--prompt", "x", "--choices", "a,b", "--output", link).exit_code == 0
    assert link.is_symlink() and '"answer"' in real.read_text()
