"""The training loss every trainer shares (experts, PHATGOOSE gates, MoE++ routers)."""

from __future__ import annotations


def answer_loss(model, batch: dict, *, top_rows: bool = False):
    """Mean cross-entropy over the answer tokens, the LM head run only where needed.

    ``top_rows``: the top layer's frozen MLP products, too, run only on the tokens that
    predict answer tokens (:func:`recycle.scoring.top_rows`; the same loss and gradients,
    bit for bit). Left off where something reads every token of that layer's MLP
    (routing statistics, a router's load-balancing loss).
    """
    import torch

    from recycle import scoring

    labels = batch["labels"]
    tgt = labels[:, 1:] != -100  # position p predicts labels[p + 1]
    rows, cols = tgt.nonzero(as_tuple=True)
    keep = torch.unique(cols)
    index = rows * labels.shape[1] + cols if top_rows else None
    try:
        with scoring.top_rows(model, index):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           logits_to_keep=keep, use_cache=False).logits
        if logits.shape[1] != keep.numel():
            raise TypeError("logits_to_keep ignored")
        at = torch.searchsorted(keep, cols)
    except TypeError:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        at = cols
    picked = logits[rows, at].float()
    return torch.nn.functional.cross_entropy(picked, labels[rows, cols + 1])
