"""Read and validate PEFT LoRA adapter folders without unpickling anything.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's own
format). The safetensors header is parsed by hand first so that a truncated or corrupt
file is refused with a precise message before any tensor is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from recycle.errors import RecycleError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# [base_model.model.]<module path>.lora_A.weight, or .lora_A.<adapter name>.weight
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
PATTERN_SECONDS = 1.0  # a rank/alpha pattern that takes longer than this to match is refused
PICKLE_WEIGHTS = "adapter_model.bin"
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


def pattern_key(patterns, module_path: str, where: str = "pattern") -> str | None:
    """The first key of ``patterns`` that matches a suffix of ``module_path``, by PEFT's rule
    (``peft.utils.other.get_pattern_key``: ``(.*[.])?(KEY)$``), or None. Matched with the
    ``regex`` engine under a time bound, so that a crafted pattern cannot hang a process;
    an invalid or runaway pattern is one clear error naming it."""
    import regex

    for key in patterns or ():
        try:
            found = regex.match(rf"(.*\.)?({key})$", module_path, timeout=PATTERN_SECONDS)
        except TimeoutError:
            raise RecycleError(f"{where} key {key!r} takes too long to match (a runaway regular expression)") from None
        except (regex.error, TypeError) as e:
            raise RecycleError(f"{where} key {key!r} is not a valid regular expression ({e})") from None
        if found:
            return key
    return None


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


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # LoRA factors are floating point


def read_safetensors_header(path: Path, data: bytes | None = None) -> dict:
    """The header of a safetensors file, checked entry by entry against the file's real
    size before any tensor is read: known dtypes, integer shapes and offsets, tensors that
    tile the data exactly (no gaps, no overlaps, nothing past the end or after it).
    ``data``: the file's bytes, already read (the header is then theirs)."""
    size = len(data) if data is not None else path.stat().st_size
    try:
        with (io.BytesIO(data) if data is not None else open(path, "rb")) as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterError(f"{path}: safetensors header unreadable ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: safetensors header unreadable (not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for key, t in header.items():
        bad = AdapterError(f"{path}: safetensors entry {key!r} is malformed (dtype, shape and data_offsets needed)")
        if not isinstance(t, dict):
            raise bad
        offsets, shape, dtype = t.get("data_offsets"), t.get("shape"), t.get("dtype")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets)
                or not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape)
                or not isinstance(dtype, str)):
            raise bad
        if dtype not in _DTYPE_BYTES:
            raise AdapterError(f"{path}: safetensors entry {key!r} has unknown dtype {dtype!r}")
        start, stop = offsets
        count = 1
        for d in shape:
            count *= d
        if stop < start or stop - start != count * _DTYPE_BYTES[dtype]:
            raise AdapterError(f"{path}: safetensors entry {key!r} has the wrong byte size")
        spans.append((start, stop, key))
    pos = 0
    for start, stop, key in sorted(spans):
        if start != pos:
            what = "overlaps the one before it" if start < pos else "leaves a gap before it"
            raise AdapterError(f"{path}: safetensors entry {key!r} {what}")
        pos = stop
    if pos > data_len:
        raise AdapterError(f"{path}: safetensors file is truncated ({data_len} data bytes, header needs {pos})")
    if pos < data_len:
        raise AdapterError(f"{path}: safetensors file has {data_len - pos} trailing bytes")
    return header


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_tensors(path: Path, data: bytes | None = None) -> None:
    """Every tensor of a (header-checked) safetensors file read with ``safetensors`` and
    found finite: NaN or infinite LoRA weights are refused here, not met in a prediction.
    ``data``: the file's bytes, already read (checked instead of the file)."""
    import numpy as np
    from safetensors import SafetensorError, safe_open

    # numpy, not torch: a command that registers adapters need not import torch (seconds);
    # bfloat16, which numpy lacks, is read with torch
    header = read_safetensors_header(path, data)
    try:
        if data is not None:
            if any(t["dtype"] == "BF16" for t in header.values()):
                import torch
                from safetensors.torch import load as load_bytes

                finite = lambda t: not t.is_floating_point() or bool(torch.isfinite(t).all())  # noqa: E731
            else:
                from safetensors.numpy import load as load_bytes

                finite = lambda t: t.dtype.kind != "f" or bool(np.isfinite(t).all())  # noqa: E731
            for key, t in load_bytes(data).items():
                if not finite(t):
                    raise AdapterError(f"{path}: tensor {key} has NaN or infinite values")
            return
        if any(t["dtype"] == "BF16" for t in header.values()):
            import torch

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise AdapterError(f"{path}: tensor {key} has NaN or infinite values")
            return
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.dtype.kind == "f" and not bool(np.isfinite(t).all()):
                    raise AdapterError(f"{path}: tensor {key} has NaN or infinite values")
    except SafetensorError as e:
        raise AdapterError(f"{path}: safetensors file unreadable ({' '.join(str(e).split())[:150]})") from None


def check_and_hash(info: AdapterInfo, base_shapes: dict[str, tuple[int, int]] | None) -> str:
    """What :func:`inspect_adapter` checks with ``base_shapes`` and ``check_values``, for an
    ``info`` it returned without them, reading the weights once: their sha256 is of the
    very bytes whose header and values are checked (content changed since ``info`` was read
    is checked as it now is: a header that differs from ``info``'s is refused)."""
    folder = info.path
    for module, ((_, d_in), (d_out, _)) in info.shapes.items():
        if base_shapes is None:
            break
        if module not in base_shapes:
            raise AdapterError(f"{folder}: target module {module} is absent from the base model")
        out_f, in_f = base_shapes[module]
        if (d_out, d_in) != (out_f, in_f):
            raise AdapterError(f"{folder}: {module} is {d_in}->{d_out} in the adapter but {in_f}->{out_f} in the base model")
    data = info.weights.read_bytes()
    header = read_safetensors_header(info.weights, data)
    now = {}
    for key, t in header.items():
        m = LORA_KEY.match(key)
        now[(m["path"], m["which"]) if m and t["dtype"] in FLOAT_DTYPES else key] = tuple(t["shape"])
    if now != {(module, w): shape for module, (a, b) in info.shapes.items() for w, shape in (("A", a), ("B", b))}:
        raise AdapterError(f"{folder}: {WEIGHTS} changed while it was being registered; add it again")
    check_tensors(info.weights, data)
    return hashlib.sha256(data).hexdigest()


def _pattern_value(patterns: dict, module: str, default, where: str):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module-path suffix."""
    key = pattern_key(patterns, module, where)
    return default if key is None else patterns[key]


def inspect_adapter(path: str | Path, base_shapes: dict[str, tuple[int, int]] | None = None, *,
                    check_values: bool = True) -> AdapterInfo:
    """Validate an adapter folder; raise :class:`AdapterError` naming the first problem.

    ``base_shapes`` (``{module: (out, in)}`` of the base model's Linear layers) enables
    the checks against the base model; ``check_values`` reads every tensor (finite).
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
        config = json.loads(cfg_path.read_text(), parse_constant=_no_constant)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except RecursionError:
        raise AdapterError(f"{folder}: {CONFIG} is nested too deeply to be an adapter config") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{folder}: {CONFIG} is unparsable ({' '.join(str(e).split())[:150]})") from None

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
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{folder}: unsupported: fan_in_fan_out (Conv1D) targets cannot be routed")
    r = config.get("r")
    if not _is_int(r):
        raise AdapterError(f"{folder}: {CONFIG} has r={r!r}; it must be a whole number")
    if r <= 0:
        raise AdapterError(f"{folder}: {CONFIG} has rank r={r}; it must be positive")
    alpha = config.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{folder}: {CONFIG} has lora_alpha={alpha!r}; it must be a positive number")
    alpha = float(alpha)
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{folder}: {CONFIG} {key} must be an object of pattern: value")
        for pat, value in patterns.items():
            ok = _is_int(value) and value > 0 if key == "rank_pattern" else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0)
            if not ok:
                raise AdapterError(f"{folder}: {CONFIG} {key}[{pat!r}] = {value!r} is not a positive number")

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
        if t["dtype"] not in FLOAT_DTYPES:
            raise AdapterError(f"{folder}: {key} has dtype {t['dtype']}; LoRA weights must be floating point")
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
    if check_values:
        check_tensors(weights)
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


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


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
