"""Reading LoRA experts from PEFT adapter folders, without PEFT in the loop.

An adapter folder is what ``PeftModel.save_pretrained`` writes: ``adapter_config.json``
and ``adapter_model.safetensors``. Weights are read with ``safetensors`` only (never
pickle). For every adapted module we keep ``A`` (r x d_in), ``B`` (d_out x r) and the
scaling ``s`` PEFT would use there: ``alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA,
``r`` and ``alpha`` resolved through ``rank_pattern`` / ``alpha_pattern`` exactly as
PEFT resolves them.

Module paths are relative to the base model PEFT wrapped (for a causal LM:
``model.layers.0.self_attn.q_proj``), i.e. the key minus ``base_model.model.`` and
minus ``.lora_A.weight``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recycle.adapters import CONFIG as CONFIG_NAME
from recycle.adapters import LORA_KEY, pattern_key
from recycle.adapters import WEIGHTS as WEIGHTS_NAME
from recycle.errors import RecycleError

PEFT_PREFIX = "base_model.model."


def lora_scaling(config: dict, module_path: str) -> float:
    """PEFT's scaling for ``module_path`` under an adapter ``config`` (a loaded adapter_config)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rk = pattern_key(rank_pattern, module_path, f"{CONFIG_NAME} rank_pattern")
    ak = pattern_key(alpha_pattern, module_path, f"{CONFIG_NAME} alpha_pattern")
    r = rank_pattern[rk] if rk is not None else config["r"]
    alpha = alpha_pattern[ak] if ak is not None else config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


@dataclass
class ExpertModule:
    """One expert's LoRA factors at one module: ``Δ(x) = scaling · B A x``."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """The dense ``s · B A`` (d_out x d_in), in float32."""
        return self.scaling * (self.B.float() @ self.A.float())


@dataclass
class LoraExpert:
    """A LoRA adapter read from disk: its name, folder, config and factors per module.

    A lazy expert (``load_expert(..., lazy=True)``) holds the factors' shapes only (meta
    tensors); :meth:`materialise` reads them (hash-checked against ``sha256``). Installing
    lazy experts reads each file once, straight into the stacked layout, so a composition
    never holds every expert's factors twice."""

    name: str
    path: Path
    config: dict
    modules: dict[str, ExpertModule] = field(default_factory=dict)
    sha256: str | None = None

    @property
    def lazy(self) -> bool:
        return any(m.A.is_meta for m in self.modules.values())

    def materialise(self) -> LoraExpert:
        """This expert with its factors read (itself where they are already)."""
        return load_expert(self.path, self.name, self.sha256) if self.lazy else self


def load_expert(path: str | Path, name: str | None = None, sha256: str | None = None, *,
                lazy: bool = False) -> LoraExpert:
    """Read one PEFT LoRA adapter folder into a :class:`LoraExpert` (``lazy``: the factors'
    shapes only, from the safetensors header; the weights are read when installed).

    With ``sha256`` (the registry's hash of the weights file) the bytes read are hashed
    as they are used and must match, so weights changed in place (same size and mtime,
    which the registry's quick check trusts) are refused, never computed with.
    Raises :class:`RecycleError` for a missing folder/file, a non-LoRA adapter, DoRA,
    or LoRA on embeddings (only linear targets are routed).
    """
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise RecycleError(f"{path} is not a PEFT adapter folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise RecycleError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise RecycleError(f"{path}: DoRA adapters cannot be routed")
    if config.get("fan_in_fan_out"):
        raise RecycleError(f"{path}: fan_in_fan_out (Conv1D) targets are not supported")

    factors: dict[str, dict[str, torch.Tensor]] = {}
    tensors = _header_tensors(weights_file) if lazy else _read_weights(weights_file, name or path.name, sha256)
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise RecycleError(f"{path}: unsupported tensor {key!r} (only lora_A/lora_B on linear layers)")
        factors.setdefault(match["path"], {})[match["which"]] = tensor
    modules = {}
    for module_path, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise RecycleError(f"{path}: {module_path} has lora_{next(iter(ab))} only")
        modules[module_path] = ExpertModule(ab["A"], ab["B"], lora_scaling(config, module_path))
    if not modules:
        raise RecycleError(f"{path}: adapter has no LoRA weights")
    return LoraExpert(name=name or path.name, path=path, config=config, modules=modules, sha256=sha256)


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _header_tensors(weights_file: Path) -> dict[str, torch.Tensor]:
    """Meta tensors of the shapes and dtypes a safetensors file's header names (nothing read
    but the header, checked entry by entry)."""
    from recycle.adapters import AdapterError, read_safetensors_header

    try:
        header = read_safetensors_header(weights_file)
    except AdapterError as e:
        raise RecycleError(str(e)) from None
    out = {}
    for key, entry in header.items():
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise RecycleError(f"{weights_file}: tensor {key!r} has dtype {entry.get('dtype')}, not a float type")
        out[key] = torch.empty(entry["shape"], dtype=dtype, device="meta")
    return out


def _read_weights(weights_file: Path, name: str, sha256: str | None) -> dict[str, torch.Tensor]:
    """The adapter's tensors from one read of its file, checked against ``sha256``."""
    import hashlib

    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = weights_file.read_bytes()
    except OSError as e:
        raise RecycleError(f"cannot read adapter weights {weights_file}: {e.strerror}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise RecycleError(f"the weights of expert {name} changed on disk since it was registered "
                           f"({weights_file} no longer has the registered sha256 {sha256[:12]}); re-register it with: "
                           f"recycle add-expert {weights_file.parent} --name {name} --replace")
    try:
        return load(data)
    except SafetensorError as e:
        raise RecycleError(f"cannot read adapter weights {weights_file}: {' '.join(str(e).split())}") from None


def load_vectors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a gates / prototypes file: safetensors dict ``module path -> vector [d_in]``.

    Keys may carry PEFT's ``base_model.model.`` prefix; it is stripped.
    """
    from recycle.files import load_tensors

    path = Path(path)
    if not path.is_file():
        raise RecycleError(f"no gate/prototype file at {path}")
    out = {}
    for key, tensor in load_tensors(path, "router vectors").items():
        if key.startswith(PEFT_PREFIX):
            key = key[len(PEFT_PREFIX) :]
        out[key] = tensor.reshape(-1)
    return out
