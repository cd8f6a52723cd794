"""recycle's scorer behind lm-evaluation-harness against the harness's own HFLM.

For each task, its seeded test sample (as ``recycle eval -n N --seed 0`` draws it) is
written as a local lm-eval YAML task over a JSON file (no hub); the harness then runs it
twice on SmolLM2-135M (the base model, no experts): with recycle's model class
(:class:`recycle.lmeval_model.RecycleLM`, the scorer ``recycle eval`` uses) and with
lm-eval's own ``HFLM(pretrained=model, tokenizer=tok)``. Reported per task: the largest and
mean absolute difference between the log-likelihoods the harness received, its ``acc`` and
``acc_norm`` with each model class, and recycle's own accuracy (argmax of the mean
log-probability per token, computed from the same log-likelihoods).

    python benchmarks/lmeval_hflm.py                    # rt_sentiment n=100, trec_coarse n=50

Results: benchmarks/results/lmeval-hflm.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from moepp import cpu_name  # noqa: E402  (the lscpu model, cores and AVX-512, as every benchmark names its CPU)

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"


def local_task(root: Path, name: str, examples) -> None:
    (root / f"{name}.json").write_text(json.dumps([{"prompt": e.prompt, "choices": e.choices, "label": e.label}
                                                   for e in examples]))
    (root / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / (name + '.json')}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="rt_sentiment:100,trec_coarse:50", help="task:n,...")
    ap.add_argument("--out", default=str(RESULTS / "lmeval-hflm"))
    args = ap.parse_args()

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from recycle.basemodels import load_base, resolve_base
    from recycle.lmeval_model import RecycleLM
    from recycle.methods import Plan
    from recycle.registry import Registry
    from recycle.tasks import add_task, load_examples
    from recycle.tasks.catalogue import catalogue_spec

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    reg = Registry(root / "registry.db")
    model, tok = load_base(resolve_base("smollm2-135m"))
    rows = []
    for item in args.tasks.split(","):
        task, n = item.split(":")
        add_task(reg, catalogue_spec(task))
        exs = load_examples(reg, task, "test", n=int(n), seed=0)
        local_task(root, f"local_{task}", exs)
        tm = TaskManager(include_path=str(root), include_defaults=False)
        got = {}
        for name, lm in (("recycle", RecycleLM(Plan("base", "base", "smollm2-135m", {}, [], str(root)), model, tok)),
                         ("hflm", HFLM(pretrained=model, tokenizer=tok, batch_size=16))):
            t0 = time.time()
            r = simple_evaluate(model=lm, tasks=[f"local_{task}"], task_manager=tm, log_samples=True,
                                bootstrap_iters=0)
            s = sorted(r["samples"][f"local_{task}"], key=lambda x: x["doc_id"])
            got[name] = {"lls": [[float(x[0]) for x in d["filtered_resps"]] for d in s],
                         "acc": r["results"][f"local_{task}"]["acc,none"],
                         "acc_norm": r["results"][f"local_{task}"]["acc_norm,none"], "seconds": time.time() - t0}
        diffs = [abs(a - b) for ra, rb in zip(got["recycle"]["lls"], got["hflm"]["lls"]) for a, b in zip(ra, rb)]
        ntok = [[len(tok(c, add_special_tokens=False)["input_ids"]) for c in e.choices] for e in exs]
        mean_pred = [max(range(len(ll)), key=lambda j: ll[j] / k[j]) for ll, k in zip(got["recycle"]["lls"], ntok)]
        rows.append({"task": task, "n": len(exs), "choices": len(exs[0].choices),
                     "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
                     "recycle_accuracy_mean_per_token": sum(p == e.label for p, e in zip(mean_pred, exs)) / len(exs),
                     **{f"{k}_{m}": got[k][m] for k in got for m in ("acc", "acc_norm", "seconds")}})
        print(json.dumps(rows[-1]), file=sys.stderr)
    command = "python benchmarks/lmeval_hflm.py " + " ".join(sys.argv[1:])
    about = {"command": command.strip(), "machine": f"{cpu_name()}, torch {torch.__version__}", "model": "smollm2-135m (base, no experts)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({**about, "rows": rows}, indent=2) + "\n")
    head = ["task", "n", "choices", "max abs Δ loglik", "mean abs Δ loglik", "acc (recycle / HFLM)",
            "acc_norm (recycle / HFLM)", "recycle eval's accuracy (mean per token)", "seconds (recycle / HFLM)"]
    md = [f"`{about['command']}` ({about['machine']}; {about['model']})", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        md.append(f"| {r['task']} | {r['n']} | {r['choices']} | {r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} | "
                  f"{r['recycle_acc']:.3f} / {r['hflm_acc']:.3f} | {r['recycle_acc_norm']:.3f} / {r['hflm_acc_norm']:.3f} | "
                  f"{r['recycle_accuracy_mean_per_token']:.3f} | {r['recycle_seconds']:.0f} / {r['hflm_seconds']:.0f} |")
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
