"""``peft-arrow``: PEFT's own Arrow (``peft.create_arrow_model`` with an ``ArrowConfig``) over
the same adapter folders, scored exactly as every other method: the runnable peer of
recycle's ``arrow`` (:class:`recycle.routing.ArrowRouter` mirrors PEFT's formula).

What differs from calling ``create_arrow_model`` by hand, and why:

- PEFT adds its ``arrow_router`` adapter to every module whose name the experts target, in
  every layer, also where no expert adapts the layer (experts trained on the top layers
  only, ``layers_to_transform``); there its prototype stack is empty and the forward fails
  (peft 0.21: ``stack expects a non-empty TensorList``). The router is removed from those
  modules, which then compute the base layer, as recycle's ``arrow`` does.
- PEFT needs every expert to have the same rank, shapes and target modules (it raises
  otherwise): this method refuses such a set in one line; recycle's ``arrow`` takes them.
- PEFT computes every expert per token and keeps the top-k weights; recycle's computes only
  the top-k. Same numbers up to float rounding; PEFT's power iteration always runs 15 steps.
- Routing is not recorded (PEFT's layers have no hook for it). GenKnowSub is off.
"""

from __future__ import annotations

from dataclasses import dataclass

from recycle.errors import RecycleError
from recycle.methods.method import Method, Settings, setting


@dataclass(frozen=True)
class PeftArrowSettings(Settings):
    top_k: int = setting(2, "experts per token (ArrowConfig.top_k)", minimum=1)
    temperature: float = setting(1.0, "router temperature (ArrowConfig.router_temperature)", positive=True)
    seed: int = setting(0, "seed of the power iteration's start (ArrowConfig.rng_seed)")


class PeftArrow(Method):
    name = "peft-arrow"
    summary = "PEFT's own Arrow (create_arrow_model) over the same adapters: the peer of arrow"
    Settings = PeftArrowSettings
    in_default_eval = False

    def build(self, model, experts, settings):
        return install_peft_arrow(model, experts, settings, self.name)


def install_peft_arrow(model, experts, settings, method: str = "peft-arrow"):
    """Load the experts' folders into ``model`` (in place) with ``create_arrow_model``; the
    handle's ``remove()`` unloads them again."""
    from peft import ArrowConfig, create_arrow_model
    from peft.tuners.lora import LoraLayer

    if not experts:
        raise RecycleError(f"method {method} needs at least one expert")
    if settings.top_k > len(experts):
        raise RecycleError(f"{method}: top_k {settings.top_k} is more than the {len(experts)} experts")
    config = ArrowConfig(top_k=settings.top_k, router_temperature=settings.temperature, rng_seed=settings.seed)
    try:
        peft_model = create_arrow_model(model, [str(e.path) for e in experts], config)
    except (ValueError, TypeError) as e:
        _strip(model)
        raise RecycleError(f"{method}: PEFT's create_arrow_model refused the experts: "
                           f"{' '.join(str(e).split())[:200]}") from None
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and "arrow_router" in module.lora_A \
                and not any(k.startswith("task_") for k in module.lora_A):
            module.delete_adapter("arrow_router")  # no expert adapts this layer: the base layer
    return _handle(peft_model, model, method, [e.name for e in experts])


def _strip(model) -> None:
    """Take any LoRA layer PEFT left in ``model`` out again (after a refusal)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.get_base_layer())


def _handle(peft_model, model, method: str, names: list[str]):
    """A :class:`~recycle.routing.engine.RoutedModel` whose ``remove()`` also unloads PEFT's
    layers (the base weights are never changed). Defined here: the module imports no torch."""
    from recycle.routing.engine import RoutedModel

    class PeftArrowHandle(RoutedModel):
        def remove(self) -> None:
            if self.peft is not None:
                self.peft.unload()
                self.peft = None
            super().remove()

    handle = PeftArrowHandle(model, method, names, {})
    handle.peft = peft_model
    return handle


METHOD = PeftArrow()
