"""A mixed library routes by the explicit formula, expert by expert.

Real libraries mix ranks, alphas, rsLoRA and target modules (and layers). On the tiny Llama, a
library of such PEFT adapters is composed with PHATGOOSE routing (top-2) and every routed
module's output, for the model's own inputs to it, is compared with the formula written out
per expert from the adapter files alone (read here with safetensors, not through recycle):
``y = W x + Σ_{i ∈ top-k} p_i s_i B_i A_i x`` over the experts that adapt the module, with
``s_i = alpha_i / r_i`` (``alpha_i / sqrt(r_i)`` with rsLoRA), scores ``LN(x)·LN(v_i)/sqrt(d)``
and ``p`` the softmax over the kept scores; an expert that does not adapt a module adds
nothing there. Every dispatch path is checked: dense, CSR (ragged columns where ranks
differ), and the padded blocks used with gradients.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SPECS = [  # r, alpha, rslora, targets, layers
    (2, 4, False, ("q_proj", "v_proj"), None),
    (4, 16, True, ("q_proj", "k_proj", "v_proj", "o_proj"), None),
    (8, 8, False, ("gate_proj", "up_proj", "down_proj"), [2, 3]),
    (4, 32, False, ("q_proj", "v_proj", "up_proj", "down_proj"), [3]),
    (8, 16, True, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), None),
    (2, 2, True, ("v_proj",), [0, 1]),
    (16, 8, False, ("q_proj", "up_proj"), None),
    (4, 8, False, ("k_proj", "o_proj", "down_proj"), [1, 2, 3]),
]


@pytest.fixture(scope="module")
def library(tmp_path_factory, make_adapter):
    root = tmp_path_factory.mktemp("mixed")
    out = []
    for i, (r, alpha, rslora, targets, layers) in enumerate(SPECS):
        kw = {"layers_to_transform": layers} if layers else {}
        out.append(make_adapter(root / f"m{i}", r=r, targets=targets, seed=100 + i, lora_alpha=alpha,
                                use_rslora=rslora, **kw))
    return out


def explicit_factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module path: (A, B, s)}`` read from the adapter's own files."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    s = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            path = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            out[path] = (a.double(), tensors[key.replace(".lora_A.", ".lora_B.")].double(), s)
    return out


def test_mixed_ranks_alphas_rslora_and_targets_route_by_the_formula(library, tiny_base):
    from transformers import AutoModelForCausalLM

    from recycle.routing import GateRouter, RoutedLoraLinear, install_routed, load_expert

    names = [f"m{i}" for i in range(len(library))]
    factors = {n: explicit_factors(f) for n, f in zip(names, library)}
    g = torch.Generator().manual_seed(0)
    gates = {n: {p: torch.randn(a.shape[1], generator=g, dtype=torch.float64).float() for p, (a, _, _) in fs.items()}
             for n, fs in factors.items()}
    assert len({s for fs in factors.values() for _, _, s in fs.values()}) >= 5  # the scalings differ
    ids = torch.randint(3, 200, (2, 9), generator=g)
    paths_covered = set()
    for mode in ("dense", "csr", "blocks"):
        model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
        experts = [load_expert(f, n) for f, n in zip(library, names)]
        default = RoutedLoraLinear.dense_max_columns
        RoutedLoraLinear.dense_max_columns = 10**9 if mode == "dense" else 0
        try:
            handle = install_routed(model, experts, lambda layer: GateRouter(layer, gates, top_k=2), "phatgoose")
        finally:
            RoutedLoraLinear.dense_max_columns = default
        seen = {}

        def hook(module, args, output):
            seen[module.path] = (args[0].detach().clone(), output.detach().clone())

        hooks = [m.register_forward_hook(hook) for m in handle.routed]
        for m in handle.routed:
            m.group = None  # each module's own scores (siblings' shared ones are tested in test_routing)
            assert m.dense == (mode == "dense")
        with torch.set_grad_enabled(mode == "blocks"):
            if mode == "blocks":
                model.get_input_embeddings().weight.requires_grad_(True)  # gradients flow: the block kernel
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        for path, (x, y) in seen.items():
            here = [n for n in names if path in factors[n]]
            assert handle.layers[path].expert_names == here  # only the experts that adapt it
            x2 = x.reshape(-1, x.shape[-1]).double()
            base = handle.layers[path].base_layer
            want = x2 @ base.weight.double().T
            v = torch.stack([gates[n][path].double() for n in here])
            scores = F.layer_norm(x2, (x2.shape[1],)) @ F.layer_norm(v, (v.shape[1],)).T / math.sqrt(x2.shape[1])
            k = min(2, len(here))
            top, idx = scores.topk(k, dim=-1)
            p = torch.softmax(top, -1)
            for t in range(x2.shape[0]):
                for j in range(k):
                    a, b, s = factors[here[int(idx[t, j])]][path]
                    want[t] += p[t, j] * s * (b @ (a @ x2[t]))
            torch.testing.assert_close(y.reshape(-1, y.shape[-1]).double(), want, atol=2e-5, rtol=1e-4)
            paths_covered.add(path)
        handle.remove()
    # every module some expert adapts was routed and checked: all 7 kinds, in all 4 layers
    assert len(paths_covered) == 28
