"""What lists and reports experts stays readable for a large library: ``experts list``
shows the first --limit rows and a summary, ``experts verify`` the problems and a count,
routing reports the most used experts and the rest as one column."""

from __future__ import annotations

import re

from tests.conftest import cli


def said(r) -> str:
    return " ".join(r.stderr.split())


def names_in(stdout: str) -> list[str]:
    return re.findall(r"^\W*(e\d\d) ", stdout, flags=re.M)


def test_list_and_verify_summarise_a_large_library(tmp_path, make_adapter):
    for i in range(12):
        make_adapter(tmp_path / ("t_even" if i % 2 else "t_odd") / f"e{i:02d}", r=2, seed=i)
    for task in ("t_odd", "t_even"):
        r = cli("add-expert", tmp_path / task, "--recursive", "--task", task, "--base", "tiny-llama")
        assert r.exit_code == 0, r.output
    folder = tmp_path / "t_odd" / "e00"
    r = cli("experts", "list", "--limit", "5")
    assert r.exit_code == 0
    assert names_in(r.stdout) == ["e00", "e01", "e02", "e03", "e04"]
    assert "5 of 12 experts shown" in said(r) and "by task t_even 6, t_odd 6" in said(r) and "by rank 2 12" in said(r)
    r = cli("experts", "list", "--limit", "0")
    assert len(names_in(r.stdout)) == 12 and "shown" not in said(r)
    r = cli("experts", "verify")
    assert r.exit_code == 0 and "12 of 12 experts ok" in said(r) and names_in(r.stdout) == []
    assert len(names_in(cli("experts", "verify", "--all").stdout)) == 12
    (folder / "adapter_model.safetensors").unlink()
    r = cli("experts", "verify")
    assert r.exit_code == 1 and "11 of 12 experts ok, 1 with a problem" in said(r) and names_in(r.stdout) == ["e00"]


def test_routing_report_keeps_the_top_experts():
    from recycle.evaluation import top_experts

    experts = [f"x{i}" for i in range(50)]
    te = [[(1.0 if j in (3, 7) else 0.01) for j in range(50)], [(0.5 if j == 9 else 0.0) for j in range(50)]]
    mats = {"label": "pg", "experts": experts, "tasks": ["a", "b"], "layers": [0], "task_expert": te,
            "layer_expert": [[1.0 / 50] * 50]}
    shown = top_experts(mats, 3)
    assert shown["experts"] == ["x3", "x7", "x9", "other (47)"]
    assert shown["task_expert"][0][:3] == [1.0, 1.0, 0.01] and abs(shown["task_expert"][0][3] - 0.47) < 1e-9
    assert abs(sum(shown["layer_expert"][0]) - 1.0) < 1e-9  # the shares still add up
    assert top_experts(mats, 0) is mats and top_experts(mats, 50) is mats
