"""``retrieval`` (PHATGOOSE paper baseline): each example goes to the expert owning the
single nearest of up to 1000 of each expert's own training texts, embedded with
all-MiniLM-L6-v2 (cosine, 1-NN; see :mod:`recycle.routing.retrieval`)."""

from __future__ import annotations

from recycle.methods.method import Method, cache_path, own_examples

EXAMPLES = 1000  # training texts per expert (as in the paper)


class Retrieval(Method):
    name = "retrieval"
    summary = "each example to the expert owning its nearest training text (MiniLM, 1-NN)"
    needs = "task"
    per_example = True

    def gather(self, registry, plan, seed=0):
        own_examples(registry, plan, EXAMPLES, seed)

    def artifacts(self, plan, model, tokenizer):
        from recycle.routing import RetrievalIndex, SentenceEmbedder

        embedder = SentenceEmbedder.from_folder(plan.settings.get("embedder"))
        names = [m.name for m in plan.members]
        path = cache_path(plan, "retrieval", {"members": plan.member_hashes, "texts": [plan.data[n] for n in names]})
        if path.is_file():
            index = RetrievalIndex.load(path)
        else:
            index = RetrievalIndex.build(embedder, {n: [t for _, _, t in plan.data[n]] for n in names})
            index.save(path)
        return {"embedder": embedder, "index": index}

    def build(self, model, experts, settings, embedder=None, index=None):
        from recycle.routing import ExampleRouter, install_routed

        handle = install_routed(model, experts, lambda layer: ExampleRouter(self.name), self.name)
        handle.extras.update(embedder=embedder, index=index)
        return handle

    def assign(self, handle, plan, examples, tasks):
        return handle.extras["index"].choose_texts(handle.extras["embedder"], [ex.text or ex.prompt for ex in examples])


METHOD = Retrieval()
