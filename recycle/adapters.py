"""Read and validate PEFT LoRA adapter folders without unpickling anything.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's own
format). The safetensors header is parsed by hand first so that a truncated or corrupt
file is refused with a precise message before any tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from recycle.errors import RecycleError
from recycle.routing.experts import CONFIG_NAME as CONFIG
from recycle.routing.experts import LORA_KEY, pattern_key
from recycle.routing.experts import WEIGHTS_NAME as WEIGHTS

PICKLE_WEIGHTS = "adapter_model.bin"
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


class AdapterError(RecycleError):
    """A bad adapter: the message starts with the folder it is about."""


@dataclass
class AdapterInfo:
    path: Path
    weights: Path
    config: dict
    base_model: str | None
    peft_type: str
    rank: int
    alpha: float
    use_rslora: bool
    ranks: dict[str, int]  # every adapted module -> its rank
    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]]  # module -> (A shape, B shape)
    n_params: int
    target_modules: list[str] = field(default_factory=list)

    @property
    def rank_overrides(self) -> dict[str, int]:
        return {m: r for m, r in self.ranks.items() if r != self.rank}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, checked against the file's real size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: safetensors header unreadable ({e})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: safetensors header unreadable (not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    end = 0
    for key, t in header.items():
        try:
            start, stop = t["data_offsets"]
            shape, dtype = t["shape"], t["dtype"]
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{path}: safetensors header unreadable (bad entry {key!r})") from None
        count = 1
        for s in shape:
            count *= s
        if dtype in _DTYPE_BYTES and stop - start != count * _DTYPE_BYTES[dtype]:
            raise AdapterError(f"{path}: safetensors entry {key!r} has the wrong byte size")
        end = max(end, stop)
    if end > data_len:
        raise AdapterError(
            f"{path}: safetensors file is truncated ({data_len} data bytes, header needs {end})"
        )
    if end < data_len:
        raise AdapterError(f"{path}: safetensors file has {data_len - end} trailing bytes")
    return header


def _pattern_value(patterns: dict, module: str, default, where: str):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module-path suffix."""
    key = pattern_key(patterns, module, where)
    return default if key is None else patterns[key]


def inspect_adapter(path: str | Path, base_shapes: dict[str, tuple[int, int]] | None = None) -> AdapterInfo:
    """Validate an adapter folder; raise :class:`AdapterError` naming the first problem.

    ``base_shapes`` (``{module: (out, in)}`` of the base model's Linear layers) enables
    the checks against the base model.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise AdapterError(f"{folder}: missing file (no such folder)")
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a folder; give the adapter's folder")
    folder = folder.resolve()
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise AdapterError(f"{folder}: missing file {CONFIG}")
    weights = folder / WEIGHTS
    if not weights.is_file():
        if (folder / PICKLE_WEIGHTS).is_file():
            raise AdapterError(
                f"{folder}: refusing {PICKLE_WEIGHTS} (pickle); save the adapter with "
                "safe_serialization=True to get adapter_model.safetensors"
            )
        raise AdapterError(f"{folder}: missing file {WEIGHTS}")
    try:
        config = json.loads(cfg_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{folder}: {CONFIG} is unparsable ({e})") from None

    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"{folder}: unsupported peft_type {config.get('peft_type')!r} (only LORA adapters)"
        )
    if config.get("use_dora"):
        raise AdapterError(f"{folder}: unsupported: DoRA adapters (use_dora) cannot be routed")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{folder}: unsupported: modules_to_save {config['modules_to_save']} "
            "(fully trained modules cannot be recycled as LoRA experts)"
        )
    try:
        r = int(config["r"])
        alpha = float(config.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{folder}: {CONFIG} has no valid 'r'") from None
    if r <= 0:
        raise AdapterError(f"{folder}: {CONFIG} has rank r={r}; it must be positive")

    header = read_safetensors_header(weights)
    a_shapes: dict[str, tuple[int, int]] = {}
    b_shapes: dict[str, tuple[int, int]] = {}
    n_params = 0
    for key, t in header.items():
        n_params += _numel(t["shape"])
        if "lora_embedding" in key or "lora_magnitude" in key:
            raise AdapterError(f"{folder}: unsupported tensor {key} (only LoRA on Linear layers)")
        m = LORA_KEY.match(key)
        if not m:
            raise AdapterError(f"{folder}: unexpected tensor {key} in {WEIGHTS}")
        shape = tuple(t["shape"])
        if len(shape) != 2:
            raise AdapterError(f"{folder}: {key} has shape {list(shape)}; expected a matrix")
        (a_shapes if m["which"] == "A" else b_shapes)[m["path"]] = shape
    if not a_shapes:
        raise AdapterError(f"{folder}: {WEIGHTS} holds no lora_A/lora_B tensors")
    for module in sorted(set(a_shapes) ^ set(b_shapes)):
        missing = "lora_B" if module in a_shapes else "lora_A"
        raise AdapterError(f"{folder}: module {module} has no {missing} tensor")

    ranks: dict[str, int] = {}
    shapes = {}
    for module in sorted(a_shapes):
        (ra, d_in), (d_out, rb) = a_shapes[module], b_shapes[module]
        if ra != rb:
            raise AdapterError(
                f"{folder}: lora_A {list(a_shapes[module])} and lora_B {list(b_shapes[module])} "
                f"of {module} do not chain"
            )
        try:
            want = int(_pattern_value(config.get("rank_pattern"), module, r, f"{CONFIG} rank_pattern"))
        except RecycleError as e:
            raise AdapterError(f"{folder}: {e}") from None
        if ra != want:
            raise AdapterError(
                f"{folder}: {module} has rank {ra} but the config says r={want}"
            )
        ranks[module] = ra
        shapes[module] = (a_shapes[module], b_shapes[module])
        if base_shapes is not None:
            if module not in base_shapes:
                raise AdapterError(f"{folder}: target module {module} is absent from the base model")
            out_f, in_f = base_shapes[module]
            if (d_out, d_in) != (out_f, in_f):
                raise AdapterError(
                    f"{folder}: {module} is {d_in}->{d_out} in the adapter but "
                    f"{in_f}->{out_f} in the base model"
                )
    return AdapterInfo(
        path=folder,
        weights=weights,
        config=config,
        base_model=config.get("base_model_name_or_path") or None,
        peft_type=peft_type,
        rank=r,
        alpha=alpha,
        use_rslora=bool(config.get("use_rslora")),
        ranks=ranks,
        shapes=shapes,
        n_params=n_params,
        target_modules=sorted(ranks),
    )


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def find_adapter_folders(root: Path) -> list[Path]:
    """Every folder under ``root`` (itself included) that holds an adapter_config.json."""
    root = Path(root)
    if (root / CONFIG).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(CONFIG))
