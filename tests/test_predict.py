"""`predict` never gives a wrong answer with exit 0: weights changed in place are refused
as they are read, non-finite scores are an error, and every input a file controls is bounded
before it is tokenised."""

from __future__ import annotations

import json
import os

import pytest

from recycle.errors import RecycleError
from tests.conftest import cli, copy, ok, one_line_error


def test_weights_changed_in_place_with_the_same_size_and_mtime_are_refused(library, tmp_path):
    import struct

    a = copy(library["a"], tmp_path / "ea")
    ok("add-expert", a, "--base", "tiny-llama")
    ok("compose", "u", "--method", "uniform", "--all")
    args = ("predict", "u", "--prompt", "Alpha: x\nAnswer:", "--choices", " a, b")
    assert json.loads(ok(*args).stdout)["answer"] in (" a", " b")
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
    ok("add-expert", huge, "--base", "tiny-llama")
    r = cli("predict", "uniform", "--prompt", "Alpha: x\nAnswer:", "--choices", " a, b")
    err = one_line_error(r, code=1)
    assert "not a finite number" in err and "no answer given" in err and '"answer"' not in r.output


def _shard_world(tmp_path):
    from recycle import shards as S

    shards = [[{"id": 2 * i + k, "prompt": f"p{2 * i + k}", "choices": [" a", " b"]} for k in range(2)]
              for i in range(4)]
    answers = [[{"id": it["id"], "answer": " a", "scores": {" a": -1.0, " b": -2.0}} for it in sh] for sh in shards]
    for i in range(4):
        S.shard_path(tmp_path, i).write_text(S.shard_text(i, shards[i], answers[i]))
    return S, shards


def test_resumed_shards_must_answer_their_inputs(tmp_path):
    S, shards = _shard_world(tmp_path)
    assert S.done_shards(tmp_path, shards) == {0, 1, 2, 3}
    lines = S.assemble(tmp_path, [[0, 1], [2, 3], [4, 5], [6, 7]], shards, 8)
    assert [json.loads(x)["id"] for x in lines] == list(range(8))
    p = [S.shard_path(tmp_path, i) for i in range(4)]
    # shard 0 and shard 1 swap contents: the same length, the same number of lines
    a, b = p[0].read_bytes(), p[1].read_bytes()
    assert len(a) == len(b) and a.count(b"\n") == b.count(b"\n")
    p[0].write_bytes(b)
    p[1].write_bytes(a)
    p[2].write_bytes(p[2].read_bytes().replace(b'"answer": " a"', b'"answer": " b"'))  # an answer edited
    p[3].write_bytes(b"\xff\xfe" + p[3].read_bytes())  # not UTF-8
    with pytest.raises(RecycleError) as e:
        S.done_shards(tmp_path, shards)
    msg = str(e.value)
    assert e.value.exit_code == 1 and "\n" not in msg and msg.startswith("4 shard file(s)")
    for words in ("shard-000000.jsonl: answers other inputs (shard 1's)",
                  "shard-000001.jsonl: answers other inputs (shard 0's)",
                  "shard-000002.jsonl: its answers changed", "shard-000003.jsonl: not UTF-8 text (byte 0)",
                  "delete them"):
        assert words in msg
    p[0].write_text('{"id": 0}\n{"id": 1}\n')  # a shard without the header (an older version's)
    p[1].write_text(S.shard_text(1, shards[1], [{"id": 2}]))  # fewer answers than inputs
    with pytest.raises(RecycleError, match="shard-000000.jsonl: no digest header; shard-000001.jsonl: 1 answers for 2"):
        S.done_shards(tmp_path, shards)
    for x in p:
        x.unlink()
    assert S.done_shards(tmp_path, shards) == set()  # deleted shards are simply computed again


@pytest.mark.parametrize("item, words", [
    ({"prompt": "x", "choices": [f" c{i}" for i in range(20_000)]}, "20000 answer choices; at most 64"),
    ({"prompt": "x", "choices": [" a", " b", " a"]}, "the answer choice ' a' is given twice"),
    ({"prompt": "x", "choices": [" a", "b" * 1_200_000]}, "1200003 characters; at most 100000"),
    ({"prompt": "x" * 20_000_000, "choices": [" a", " b"]}, "characters; at most 100000"),
    ({"prompt": "x", "choices": [" a", " b" * 200]}, "an answer choice is 400 tokens; at most 128"),
])
def test_requests_over_a_bound_are_refused_before_scoring(library, tmp_path, item, words):
    ok("add-expert", library["a"], "--base", "tiny-llama")
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": "fine", "choices": [" a", " b"]}) + "\n" + json.dumps(item) + "\n")
    err = one_line_error(cli("predict", "uniform", "--input", f))
    assert words in err and ("in.jsonl:2" in err or "example 2" in err), err


def test_shared_choices_are_bounded_too():
    assert "--choices: the answer choice ' a' is given twice" in one_line_error(
        cli("predict", "uniform", "--prompt", "x", "--choices", " a, b, a"))
    assert "--choices: 65 answer choices; at most 64" in one_line_error(
        cli("predict", "uniform", "--prompt", "x", "--choices", ",".join(f"c{i}" for i in range(65))))


def test_predict_output_onto_a_folder(world, library, tmp_path):
    for spec in world["specs"].values():
        ok("add-task", spec)
    ok("add-expert", library["a"], "--task", "t_alpha", "--base", "tiny-llama")
    folder = tmp_path / "out"
    folder.mkdir()
    assert "it is a folder" in one_line_error(cli("predict", "uniform", "--prompt", "x", "--choices", "a,b",
                                                 "--output", folder))
    assert list(tmp_path.glob(".out*")) == []


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "x", "choices": "abc"}', "must be a list of strings"),
    ('{"prompt": "x", "choices": [1, 2]}', "must be a list of strings"),
    ('{"prompt": "", "choices": ["a", "b"]}', 'non-empty "prompt"'),
    ('{"prompt": "x", "choices": ["a"]}', "at least two"),
    ('{"prompt": "x", "choices": ["a", ""]}', "is empty"),
])
def test_predict_input_is_checked(world, library, tmp_path, line, words):
    ok("add-expert", library["a"], "--base", "tiny-llama")
    f = tmp_path / "in.jsonl"
    f.write_text(line + "\n")
    assert words in one_line_error(cli("predict", "uniform", "--input", f))


def test_predict_options_and_encoding(world, library, tmp_path):
    ok("add-expert", library["a"], "--base", "tiny-llama")
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"prompt": "caf\xe9"}\n')
    assert "not UTF-8" in one_line_error(cli("predict", "uniform", "--input", f))
    assert "--batch-size" in one_line_error(cli("predict", "uniform", "--prompt", "x", "--batch-size", "0"))
    assert "--max-new-tokens" in one_line_error(cli("predict", "uniform", "--prompt", "x", "--max-new-tokens", "-5"))
