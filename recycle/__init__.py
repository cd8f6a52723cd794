"""recycle: turn a pile of independently trained LoRA experts into one model that
generalises zero-shot (PHATGOOSE gates, routed inference, evaluation, on Ray)."""

__version__ = "0.1.0"
