"""`predict` never gives a wrong answer with exit 0: weights changed in place are refused
as they are read, non-finite scores are an error, and every input a file controls is bounded
before it is tokenised."""

from __future__ import annotations

import json
import os

import pytest

from recycle.errors import RecycleError
from tests.test_compose import TASKS, world  # noqa: F401  (fixture)
from tests.test_experts import cli, copy, library, one_line_error  # noqa: F401


def _ok(*args):
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return r


def test_weights_changed_in_place_with_the_same_size_and_mtime_are_refused(library, tmp_path):
    import struct

    a = copy(library["a"], tmp_path / "ea")
    _ok("add-expert", a, "--base", "tiny-llama")
    _ok("compose", "u", "--method", "uniform", "--all")
    args = ("predict", "u", "--prompt", "Alpha: x\nAnswer:", "--choices", " a, b")
    assert json.loads(_ok(*args).stdout)["answer"] in (" a", " b")
    w = a / "adapter_model.safetensors"
    st = os.stat(w)
    with open(w, "r+b") as f:  # in place: same inode, same size, same header; every float32 weight NaN
        (n,) = struct.unpack("<Q", f.read(8))
        assert '"F32"' in f.read(n).decode() and (st.st_size - 8 - n) % 4 == 0
        f.write(struct.pack("<f", float("nan")) * ((st.st_size - 8 - n) // 4))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(w).st_mtime_ns == st.st_mtime_ns and os.stat(w).st_size == st.st_size
    r = cli(*args)
    err = one_line_error(r)
    assert "weights of expert ea changed on disk" in err and "null" not in r.output
    assert "weights of expert ea changed" in one_line_error(cli("predict", "uniform", "--prompt", "x",
                                                                "--choices", "a,b"))


def test_non_finite_scores_are_an_error_not_an_answer(library, tmp_path):
    from safetensors.torch import load_file, save_file

    from recycle.methods.method import Scored

    with pytest.raises(RecycleError, match="choice 2 is nan"):
        Scored([[0.0, -1.0], [-0.5, float("nan")]])
    with pytest.raises(RecycleError, match="is -inf"):
        Scored([[float("-inf"), 0.0]])
    huge = copy(library["a"], tmp_path / "huge")  # finite weights whose products overflow float32
    w = huge / "adapter_model.safetensors"
    save_file({k: v.clone().fill_(1e30) for k, v in load_file(str(w)).items()}, str(w))
    _ok("add-expert", huge, "--base", "tiny-llama")
    r = cli("predict", "uniform", "--prompt", "Alpha: x\nAnswer:", "--choices", " a, b")
    err = one_line_error(r, code=1)
    assert "not a finite number" in err and "no answer given" in err and '"answer"' not in r.output
