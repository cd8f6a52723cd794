"""``avg-activation`` (PHATGOOSE paper baseline): router vector of expert i at a module = the
mean input of that module over a sample of expert i's own training data, computed on the
base model; then routed exactly as PHATGOOSE (standardised scores, top-k)."""

from __future__ import annotations

from recycle.files import load_tensors, save_tensors
from recycle.methods.method import Method, TokenSettings, cache_path, own_examples

EXAMPLES = 64  # training examples per expert averaged over


class AvgActivation(Method):
    name = "avg-activation"
    summary = "PHATGOOSE routing with mean module inputs over each expert's data as router vectors"
    Settings = TokenSettings
    needs = "task"
    token_routed = True

    def gather(self, registry, plan, seed=0):
        own_examples(registry, plan, EXAMPLES, seed)

    def artifacts(self, plan, model, tokenizer, batch_size: int = 8, max_length: int = 256):
        """The prototypes, computed on the base model from each member's own sample, cached
        by (base, adapter, sample)."""
        from recycle.data import collate, encode_lm, pad_id_of
        from recycle.routing import compute_prototypes, load_expert

        out = {}
        for m in plan.members:
            rows = plan.data[m.name]
            path = cache_path(plan, "prototypes", {"base": plan.base, "sha": m.sha256, "rows": rows})
            if path.is_file():
                out[m.name] = load_tensors(path, "prototypes")
                continue
            modules = list(load_expert(m.path, m.name, m.sha256).modules)
            enc = [encode_lm(tokenizer, p, a, max_length) for p, a, _ in rows]
            batches = [{k: v for k, v in collate(enc[i:i + batch_size], pad_id_of(tokenizer)).items() if k != "labels"}
                       for i in range(0, len(enc), batch_size)]
            vecs = compute_prototypes(model, {m.name: batches}, modules)[m.name]
            save_tensors(path, vecs)
            out[m.name] = vecs
        return {"prototypes": out}

    def build(self, model, experts, settings, prototypes=None):
        from recycle.methods.phatgoose import vectors_for
        from recycle.routing import AvgActivationRouter, install_routed

        vectors = vectors_for(prototypes, [e.name for e in experts], "prototypes")
        return install_routed(
            model, experts,
            lambda layer: AvgActivationRouter(layer, vectors, settings.top_k, settings.weighting, settings.temperature),
            self.name)


METHOD = AvgActivation()
