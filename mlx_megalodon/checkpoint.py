"""The one weight conversion between upstream Megalodon checkpoints and MLX model directories.

Used by both implementations (``torch_ref`` loads through :func:`load_upstream_state`, the MLX
model through :func:`load_mlx_weights`), so it uses torch, safetensors and sentencepiece but
never MLX. torch is imported on first use, so configuration errors are reported quickly.

Upstream checkpoint directory (megalodon/reloading.py):
    config.json              {"model": {ModelConf fields}, "tokenizer": {"path": ..., ...}}
    consolidate_config.json  {"model_parallel_size": M, "dtype": "fp32" | "bf16" | "fp16"}
    consolidated.pth  or  consolidated.00.pth ... consolidated.{M-1:02d}.pth
    a SentencePiece model

MLX model directory (what :func:`convert` writes):
    config.json              ModelArgs.to_dict() (vocab_size resolved)
    model.safetensors        metadata {"format": "mlx"}; or model-0000i-of-0000N.safetensors shards
                             plus model.safetensors.index.json
    tokenizer.model

MLX weight keys and shapes are upstream's, minus ``rope.freqs`` (derived from the config) and, when
``share_emb``, minus ``output.output.weight`` (it is ``embed.weight``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

from .config import (ConfigError, ModelArgs, is_full_precision_key, model_parallel_split_dim,
                     upstream_shapes)
from .tokenizer import Tokenizer, TokenizerError, find_tokenizer_file


class _LazyTorch:
    """``torch``, imported on first use: the CLI reports config, tokenizer and destination errors
    without paying for the torch import (about 2 s)."""

    def __getattr__(self, name):
        import torch as real
        globals()["torch"] = real
        return getattr(real, name)


torch = _LazyTorch()

PathLike = Union[str, Path]
StateDict = Dict[str, "torch.Tensor"]

#: Largest single safetensors file written; above it the weights are sharded. Tests pass a tiny value.
MAX_SHARD_BYTES = 5 * 1024 ** 3

MLX_WEIGHTS = "model.safetensors"
MLX_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
CONSOLIDATE_CONFIG = "consolidate_config.json"
TOKENIZER = "tokenizer.model"

#: MLX dtype names accepted by --dtype (torch has dtypes of the same names).
DTYPES: Tuple[str, ...] = ("float32", "bfloat16", "float16")
# upstream's consolidate_config "dtype" names
UPSTREAM_DTYPES: Dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class CheckpointError(Exception):
    """A checkpoint that cannot be read or written; the message is one line naming the file or key."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


def _one_line(text, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _why(e: BaseException) -> str:
    msg = _one_line(str(e), 200)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# --------------------------------------------------------------------------- dtypes
def _dtype_name(dtype) -> Optional[str]:
    """Canonical name ("float32", ...) of an MLX or upstream dtype name, or None for None."""
    if dtype is None:
        return None
    if not isinstance(dtype, str):
        for name in DTYPES:
            if getattr(torch, name) == dtype:
                return name
    else:
        if dtype in DTYPES:
            return dtype
        for name, up in UPSTREAM_DTYPES.items():
            if dtype == up:
                return name
    raise CheckpointError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")


def _cast(key: str, t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    if key.endswith(".prior_count"):
        return t.to(torch.int64)
    if not t.is_floating_point():
        return t
    if is_full_precision_key(key):
        return t.to(torch.float32)
    return t if dtype is None else t.to(dtype)


def numpy_view(t: torch.Tensor):
    """(numpy array, dtype name) of a CPU tensor without copying where possible. numpy has no
    bfloat16, so a bfloat16 tensor comes back as its uint16 bit pattern with the name "bfloat16";
    an MLX caller rebuilds it with ``mx.array(a).view(mx.bfloat16)``."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("uint16"), "bfloat16"
    return t.numpy(), str(t.dtype).replace("torch.", "")


# --------------------------------------------------------------------------- derived tensors
def rope_freqs(args: ModelArgs) -> torch.Tensor:
    """Upstream's ``rope.freqs`` buffer, bit for bit (RotaryEmbedding._precompute_freqs)."""
    dz, base = args.z_head_dim, args.rope_theta
    freqs = torch.tensor([base ** (j / dz) for j in range(0, dz, 2)], dtype=torch.float32)
    return 1.0 / freqs


def mlx_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Every MLX weight key with its shape (upstream's minus the derived tensors)."""
    shapes = upstream_shapes(args)
    del shapes["rope.freqs"]
    if args.share_emb:
        del shapes["output.output.weight"]
    return shapes


def _guard_layer_count(args: ModelArgs, keys) -> None:
    """Name the first missing layer before building a shape table for an absurd num_layers."""
    if args.num_layers <= len(keys):
        return
    for i in range(args.num_layers):
        k = f"layers.{i}.mega.wv.weight"
        if k not in keys:
            raise CheckpointError(f"missing key '{k}' (config num_layers={args.num_layers})")


def _validate(args: ModelArgs, sd: Mapping, shapes: Dict[str, Tuple[int, ...]], what: str,
              quantized_ok: bool = False) -> None:
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{what} is a {type(sd).__name__}, expected a dict of tensors")
    quantized = set()
    if quantized_ok:
        quantized = {k[: -len(".scales")] for k in sd if isinstance(k, str) and k.endswith(".scales")}
    for key in shapes:
        if key not in sd:
            raise CheckpointError(f"missing key '{key}' in {what}")
    for key, value in sd.items():
        if not isinstance(key, str):
            raise CheckpointError(f"unexpected non-string key {key!r} in {what}")
        base = key.rsplit(".", 1)[0]
        if key not in shapes:
            if base in quantized and key.rsplit(".", 1)[1] in ("scales", "biases") \
                    and f"{base}.weight" in shapes:
                continue
            raise CheckpointError(f"unexpected key '{key}' in {what}")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"key '{key}' in {what} is a {type(value).__name__}, not a tensor")
        if base in quantized and key.endswith(".weight"):
            continue
        expected = tuple(shapes[key])
        found = tuple(value.shape)
        if found != expected:
            raise CheckpointError(f"key '{key}' in {what} has shape {list(found)}, expected {list(expected)}")
        if key.endswith(".prior_count"):
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise CheckpointError(f"key '{key}' in {what} has dtype {value.dtype}, expected an integer")
        elif not value.is_floating_point():
            raise CheckpointError(f"key '{key}' in {what} has dtype {value.dtype}, expected floating point")


def validate_upstream_state_dict(args: ModelArgs, sd: Mapping) -> None:
    """Raise CheckpointError naming the first missing, unexpected, misshaped or non-tensor key."""
    if isinstance(sd, Mapping):
        _guard_layer_count(args, sd)
    _validate(args, sd, upstream_shapes(args), "upstream state dict")


def validate_mlx_weights(args: ModelArgs, weights: Mapping) -> None:
    """Same as validate_upstream_state_dict for MLX weights (no rope.freqs, no tied output)."""
    if isinstance(weights, Mapping):
        _guard_layer_count(args, weights)
    _validate(args, weights, mlx_shapes(args), "MLX weights", quantized_ok=args.quantization is not None)


def _check_derived(args: ModelArgs, sd: Mapping, where: str = "upstream state dict") -> None:
    """rope.freqs must be upstream's value for this config; with share_emb the output weight must
    equal the embedding."""
    found = sd["rope.freqs"]
    derived = rope_freqs(args)
    if not torch.equal(found.detach().cpu(), derived.to(found.dtype)):
        raise CheckpointError(
            f"key 'rope.freqs' in {where} does not match rope_base={args.rope_base} and "
            f"z_dim/num_heads={args.z_head_dim} from the config")
    if args.share_emb:
        out, emb = sd["output.output.weight"], sd["embed.weight"]
        if out is not emb and not torch.equal(out, emb):
            raise CheckpointError(f"key 'output.output.weight' in {where} differs from 'embed.weight' "
                                  f"although the config has share_emb=true")


# --------------------------------------------------------------------------- conversions
def upstream_to_mlx(args: ModelArgs, sd: Mapping, dtype: Optional[str] = "float32") -> StateDict:
    """MLX weights from an upstream state dict. ``dtype`` casts floating tensors except the
    full-precision ones (CEMA, norms, Q/K affine), which are float32; None keeps the source dtype."""
    validate_upstream_state_dict(args, sd)
    _check_derived(args, sd)
    target = None if dtype is None else getattr(torch, _dtype_name(dtype))
    out: StateDict = {}
    for key in mlx_shapes(args):
        out[key] = _cast(key, sd[key], target)
    return out


def mlx_to_upstream(args: ModelArgs, weights: Mapping) -> StateDict:
    """Upstream state dict (keys in upstream's order) from MLX weights, re-creating rope.freqs and,
    with share_emb, ``output.output.weight`` as the very tensor object ``embed.weight``."""
    if args.quantization is not None:
        raise CheckpointError("quantized MLX weights cannot be converted to an upstream checkpoint")
    validate_mlx_weights(args, weights)
    sd: StateDict = {}
    for key in upstream_shapes(args):
        if key == "rope.freqs":
            sd[key] = rope_freqs(args)
        elif key == "output.output.weight" and args.share_emb:
            sd[key] = sd["embed.weight"]
        else:
            sd[key] = weights[key]
    return sd


def _cast_all(args: ModelArgs, sd: Mapping, dtype: Optional[str]) -> StateDict:
    target = None if dtype is None else getattr(torch, _dtype_name(dtype))
    out = {k: _cast(k, v, target) for k, v in sd.items()}
    if args.share_emb and "output.output.weight" in out:
        out["output.output.weight"] = out["embed.weight"]
    return out


# --------------------------------------------------------------------------- config / tokenizer
def _read_json(path: Path, what: str = "file"):
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({_why(e)})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({_why(e)})") from e


def _split_config(cfg, path: Path) -> Tuple[dict, dict]:
    """(model section, tokenizer section) of an upstream-style or bare model config."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: config must be a JSON object, got {type(cfg).__name__}")
    if "model" in cfg:
        model, tok = cfg["model"], cfg.get("tokenizer", {})
        if not isinstance(model, dict):
            raise CheckpointError(f"{path}: 'model' must be a JSON object")
        if tok is None:
            tok = {}
        if not isinstance(tok, dict):
            raise CheckpointError(f"{path}: 'tokenizer' must be a JSON object")
        return model, tok
    return cfg, {}


def _additional_vocab(tok_cfg: dict, path: Path) -> int:
    extra = tok_cfg.get("additional_vocab_size", 0)
    if extra is None:
        extra = 0
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise CheckpointError(f"{path}: tokenizer field 'additional_vocab_size' must be a non-negative "
                              f"integer, got {extra!r}")
    return extra


def _find_tokenizer(directory: Path, tok_cfg: dict, override: Optional[PathLike]) -> Optional[Path]:
    if override is not None:
        p = Path(override)
        if not p.is_file():
            raise TokenizerError(f"tokenizer model not found: {p}")
        return p
    cfg_path = tok_cfg.get("path")
    if isinstance(cfg_path, str) and cfg_path:
        p = Path(cfg_path)
        for cand in ([directory / p, p] if not p.is_absolute() else [p]):
            try:
                if cand.is_file():
                    return cand
            except (OSError, ValueError):       # unreadable or malformed path in the config
                pass
    return find_tokenizer_file(directory)


def _args_from_config(model_cfg: dict, tok_cfg: dict, cfg_path: Path,
                      tokenizer_path: Optional[Path]) -> ModelArgs:
    """ModelArgs with vocab_size resolved (upstream rule for -1) and checked against the tokenizer."""
    model_cfg = dict(model_cfg)
    extra = _additional_vocab(tok_cfg, cfg_path)
    tok = None
    if tokenizer_path is not None:
        tok = Tokenizer(tokenizer_path, additional_vocab_size=extra)   # TokenizerError names the file
    vocab = model_cfg.get("vocab_size", -1)
    if vocab == -1 and not isinstance(vocab, bool):
        if tok is None:
            raise CheckpointError(f"{cfg_path}: vocab_size is -1 and no tokenizer model was found to "
                                  f"define it")
        model_cfg["vocab_size"] = tok.vocab_size
    try:
        args = ModelArgs.from_dict(model_cfg)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CheckpointError(f"{cfg_path}: invalid model config ({_why(e)})") from e
    if tok is not None and tok.vocab_size > args.vocab_size:
        raise CheckpointError(f"{tokenizer_path}: tokenizer has {tok.vocab_size} ids but the model's "
                              f"vocab_size is {args.vocab_size}")
    return args


# --------------------------------------------------------------------------- upstream files
def _torch_load(path: Path):
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load torch checkpoint ({_why(e)})") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path}: unexpected non-string key {k!r}")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: key '{k}' is a {type(v).__name__}, not a tensor")
    return dict(obj)


def _shard_files(directory: Path) -> List[Path]:
    cc_path = directory / CONSOLIDATE_CONFIG
    if cc_path.exists():
        cc = _read_json(cc_path)
        if not isinstance(cc, dict):
            raise CheckpointError(f"{cc_path}: must be a JSON object")
        m = cc.get("model_parallel_size", 1)
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise CheckpointError(f"{cc_path}: model_parallel_size must be a positive integer, got {m!r}")
    else:
        numbered = sorted(directory.glob("consolidated.[0-9][0-9].pth"))
        m = len(numbered) if numbered and not (directory / "consolidated.pth").exists() else 1
    if m == 1:
        names: Iterator[str] = iter(["consolidated.pth"])
    else:
        names = (f"consolidated.{r:02d}.pth" for r in range(m))
    files = []
    for name in names:                 # stops at the first missing shard, however large m claims
        f = directory / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file not found: {f}")
        files.append(f)
    return files


def merge_model_parallel(shards: List[Mapping], files: Optional[List[Path]] = None) -> StateDict:
    """One state dict from upstream's model-parallel shards (concatenated along each key's split
    dimension; replicated tensors must be equal on every shard)."""
    files = files or [Path(f"shard {i}") for i in range(len(shards))]
    if len(shards) == 1:
        return dict(shards[0])
    first = shards[0]
    for f, s in zip(files[1:], shards[1:]):
        for key in first:
            if key not in s:
                raise CheckpointError(f"{f}: missing key '{key}' (present in {files[0].name})")
        for key in s:
            if key not in first:
                raise CheckpointError(f"{f}: unexpected key '{key}' (absent from {files[0].name})")
    merged: StateDict = {}
    for key, t0 in first.items():
        dim = model_parallel_split_dim(key)
        parts = [s[key] for s in shards]
        if dim is None:
            for f, t in zip(files[1:], parts[1:]):
                if t.shape != t0.shape or t.dtype != t0.dtype or not torch.equal(t, t0):
                    raise CheckpointError(f"{f}: replicated key '{key}' differs from {files[0].name}")
            merged[key] = t0
        else:
            try:
                merged[key] = torch.cat(parts, dim=dim)
            except Exception as e:
                shapes = ", ".join(str(list(t.shape)) for t in parts)
                raise CheckpointError(f"key '{key}': cannot concatenate model-parallel shards along "
                                      f"dim {dim} (shapes {shapes})") from e
    return merged


def _alias_shared(args: ModelArgs, sd: StateDict) -> StateDict:
    if args.share_emb and "output.output.weight" in sd and "embed.weight" in sd:
        sd["output.output.weight"] = sd["embed.weight"]
    return sd


def _upstream_header(src: PathLike, config: Optional[PathLike], tokenizer: Optional[PathLike]
                     ) -> Tuple[ModelArgs, Optional[Path], Path, List[Path]]:
    """Config, tokenizer and weight files of an upstream checkpoint, before loading any tensor."""
    src = Path(src)
    if src.is_dir():
        directory = src
    elif src.is_file():
        directory = src.parent
    else:
        raise CheckpointError(f"no such file or directory: {src}")
    cfg_path = Path(config) if config is not None else directory / CONFIG
    model_cfg, tok_cfg = _split_config(_read_json(cfg_path, "config"), cfg_path)
    tok_path = _find_tokenizer(directory, tok_cfg, tokenizer)
    args = _args_from_config(model_cfg, tok_cfg, cfg_path, tok_path)
    files = _shard_files(directory) if src.is_dir() else [src]
    return args, tok_path, directory, files


def read_upstream(src: PathLike, config: Optional[PathLike] = None,
                  tokenizer: Optional[PathLike] = None) -> Tuple[ModelArgs, StateDict, Optional[Path]]:
    """(args, state dict in upstream's key order, tokenizer path or None) of an upstream checkpoint
    directory or a single ``.pth`` state dict (config from ``config`` or ``config.json`` beside it)."""
    args, tok_path, directory, files = _upstream_header(src, config, tokenizer)
    return args, _upstream_weights(args, directory, files), tok_path


def _upstream_weights(args: ModelArgs, directory: Path, files: List[Path]) -> StateDict:
    shards = [_torch_load(f) for f in files]
    sd = merge_model_parallel(shards, files)
    where = str(files[0]) if len(files) == 1 else f"{directory} (merged {len(files)} shards)"
    _guard_layer_count(args, sd)
    _validate(args, sd, upstream_shapes(args), where)
    _check_derived(args, sd, where)
    sd = {k: sd[k] for k in upstream_shapes(args)}
    return _alias_shared(args, sd)


# --------------------------------------------------------------------------- atomic directory writes
@contextmanager
def _atomic_dir(dst: PathLike) -> Iterator[Path]:
    """A temp dir next to ``dst`` that becomes ``dst`` on success and vanishes on any error."""
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        raise CheckpointError(f"destination already exists: {dst}")
    parent = dst.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"cannot create {dst}: {_why(e)}") from e
    try:
        yield tmp
        # some writers (safetensors) create 0600 files: give every file the umask's usual mode,
        # read off the directory mkdir just created
        mode = tmp.stat().st_mode & 0o666
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, mode)
        if dst.exists() or dst.is_symlink():
            raise CheckpointError(f"destination already exists: {dst}")
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _copy_tokenizer(tokenizer_path: Optional[PathLike], directory: Path) -> None:
    if tokenizer_path is None:
        return
    src = Path(tokenizer_path)
    if not src.is_file():
        raise TokenizerError(f"tokenizer model not found: {src}")
    shutil.copyfile(src, directory / TOKENIZER)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _safetensors_ready(weights: Mapping) -> StateDict:
    """Contiguous tensors that share no memory (safetensors refuses aliases)."""
    out: StateDict = {}
    seen = set()
    for k, t in weights.items():
        t = t.detach().contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        out[k] = t
    return out


def write_mlx_dir(dst: PathLike, args: ModelArgs, weights: Mapping, tokenizer_path: Optional[PathLike],
                  max_shard_bytes: Optional[int] = None) -> Path:
    """Write an MLX model directory atomically; shards the weights above ``max_shard_bytes``
    (default :data:`MAX_SHARD_BYTES`)."""
    from safetensors.torch import save_file
    validate_mlx_weights(args, weights)
    limit = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    weights = _safetensors_ready(weights)
    total = sum(_nbytes(t) for t in weights.values())
    groups: List[List[str]] = [[]]
    size = 0
    for k, t in weights.items():
        if groups[-1] and size + _nbytes(t) > limit:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += _nbytes(t)
    dst = Path(dst)
    with _atomic_dir(dst) as tmp:
        _write_json(tmp / CONFIG, args.to_dict())
        if total <= limit or len(groups) == 1:
            save_file(weights, str(tmp / MLX_WEIGHTS), metadata={"format": "mlx"})
        else:
            n = len(groups)
            weight_map = {}
            for i, keys in enumerate(groups):
                name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                save_file({k: weights[k] for k in keys}, str(tmp / name), metadata={"format": "mlx"})
                weight_map.update({k: name for k in keys})
            _write_json(tmp / MLX_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        _copy_tokenizer(tokenizer_path, tmp)
    return dst


def write_upstream_dir(dst: PathLike, args: ModelArgs, sd: Mapping, tokenizer_path: Optional[PathLike],
                       dtype: str = "fp32") -> Path:
    """Write an upstream checkpoint directory (model-parallel size 1) atomically. Floating tensors
    are cast to ``dtype`` except the full-precision ones, which stay float32."""
    name = _dtype_name(dtype)
    validate_upstream_state_dict(args, sd)
    _check_derived(args, sd)
    sd = _cast_all(args, {k: sd[k] for k in upstream_shapes(args)}, name)
    extra = 0
    if tokenizer_path is not None:
        extra = max(0, args.vocab_size - Tokenizer(tokenizer_path).sp_vocab_size)
    cfg = {"model": args.upstream_dict(),
           "tokenizer": {"path": TOKENIZER, "additional_vocab_size": extra, "data_tokenized": False}}
    dst = Path(dst)
    with _atomic_dir(dst) as tmp:
        _write_json(tmp / CONFIG, cfg)
        _write_json(tmp / CONSOLIDATE_CONFIG, {"model_parallel_size": 1, "dtype": UPSTREAM_DTYPES[name]})
        torch.save(sd, tmp / "consolidated.pth")
        _copy_tokenizer(tokenizer_path, tmp)
    return dst


# --------------------------------------------------------------------------- MLX directories
def _load_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({_why(e)})") from e


def _read_mlx_weights(directory: Path) -> StateDict:
    index_path = directory / MLX_INDEX
    if not index_path.exists():
        return _load_safetensors(directory / MLX_WEIGHTS)
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
    by_file: Dict[str, List[str]] = {}
    for key, fname in weight_map.items():
        if not isinstance(fname, str) or not fname or Path(fname).name != fname or fname in (".", ".."):
            raise CheckpointError(f"{index_path}: key '{key}' maps to an invalid file name {fname!r}")
        by_file.setdefault(fname, []).append(key)
    weights: StateDict = {}
    for fname, keys in by_file.items():
        path = directory / fname
        part = _load_safetensors(path)
        for key in keys:
            if key not in part:
                raise CheckpointError(f"{path}: missing key '{key}' listed in {MLX_INDEX}")
        for key, t in part.items():
            if weight_map.get(key) != fname:
                raise CheckpointError(f"{path}: key '{key}' is not mapped to this file in {MLX_INDEX}")
            weights[key] = t
    total = index.get("metadata", {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    if isinstance(total, int) and not isinstance(total, bool):
        found = sum(_nbytes(t) for t in weights.values())
        if found != total:
            raise CheckpointError(f"{index_path}: total_size is {total} but the shards hold {found} bytes")
    return weights


def read_mlx_dir(path: PathLike, tokenizer: Optional[PathLike] = None
                 ) -> Tuple[ModelArgs, StateDict, Optional[Path]]:
    """(args, MLX weights, tokenizer path or None) of an MLX model directory, all validated."""
    args, tok_path = _mlx_header(path, tokenizer)
    return args, _mlx_weights(args, Path(path)), tok_path


def _mlx_header(path: PathLike, tokenizer: Optional[PathLike]) -> Tuple[ModelArgs, Optional[Path]]:
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"not a directory: {directory}")
    cfg_path = directory / CONFIG
    model_cfg, tok_cfg = _split_config(_read_json(cfg_path, "config"), cfg_path)
    tok_path = _find_tokenizer(directory, {}, tokenizer)
    return _args_from_config(model_cfg, tok_cfg, cfg_path, tok_path), tok_path


def _mlx_weights(args: ModelArgs, directory: Path) -> StateDict:
    weights = _read_mlx_weights(directory)
    validate_mlx_weights(args, weights)
    return {k: weights[k] for k in mlx_shapes(args)} if args.quantization is None else weights


# --------------------------------------------------------------------------- hub and format detection
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve_path(path_or_repo: PathLike) -> Path:
    """An existing local path, else a Hugging Face Hub repo id fetched with snapshot_download
    (HF_HUB_OFFLINE=1 resolves from the local cache only)."""
    if not str(path_or_repo).strip():
        raise CheckpointError("empty checkpoint path")
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return p
    text = str(path_or_repo)
    if not _REPO_ID.match(text) or ".." in text or text.endswith((".pth", ".safetensors", ".json")):
        raise CheckpointError(f"no such file or directory: {text}")
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(repo_id=text, allow_patterns=["*.json", "*.safetensors", "*.pth",
                                                                 "*.model"])
    except Exception as e:
        raise CheckpointError(f"'{text}' is neither a local path nor a reachable Hugging Face Hub repo "
                              f"({_why(e)})") from e
    return Path(local)


def detect_format(path: Path) -> str:
    """"mlx" or "upstream" for a checkpoint directory or file."""
    if path.is_file():
        if path.suffix in (".pth", ".pt"):
            return "upstream"
        raise CheckpointError(f"{path}: not a checkpoint (expected a directory or a .pth state dict)")
    if (path / MLX_WEIGHTS).exists() or (path / MLX_INDEX).exists():
        return "mlx"
    if (path / CONSOLIDATE_CONFIG).exists() or any(path.glob("consolidated*.pth")):
        return "upstream"
    raise CheckpointError(f"{path}: not a Megalodon checkpoint (no {MLX_WEIGHTS}, {MLX_INDEX} or "
                          f"consolidated*.pth)")


def load_upstream_state(path_or_repo: PathLike, tokenizer: Optional[PathLike] = None
                        ) -> Tuple[ModelArgs, StateDict, Optional[Path]]:
    """(args, upstream state dict, tokenizer path) from an MLX or upstream checkpoint (or hub id)."""
    path = resolve_path(path_or_repo)
    if detect_format(path) == "mlx":
        args, weights, tok = read_mlx_dir(path, tokenizer=tokenizer)
        return args, mlx_to_upstream(args, weights), tok
    return read_upstream(path, tokenizer=tokenizer)


def load_mlx_weights(path_or_repo: PathLike, dtype: Optional[str] = None,
                     tokenizer: Optional[PathLike] = None) -> Tuple[ModelArgs, StateDict, Optional[Path]]:
    """(args, MLX weights, tokenizer path) from an MLX or upstream checkpoint (or hub id).
    ``dtype`` None keeps the stored precision (full-precision keys are float32 either way)."""
    path = resolve_path(path_or_repo)
    if detect_format(path) == "mlx":
        args, weights, tok = read_mlx_dir(path, tokenizer=tokenizer)
        if dtype is not None:
            weights = _cast_all(args, weights, dtype)
        return args, weights, tok
    args, sd, tok = read_upstream(path, tokenizer=tokenizer)
    return args, upstream_to_mlx(args, sd, dtype), tok


# --------------------------------------------------------------------------- convert / CLI
def convert(src: PathLike, dst: PathLike, dtype: str = "float32", to: str = "mlx",
            config: Optional[PathLike] = None, tokenizer: Optional[PathLike] = None,
            max_shard_bytes: Optional[int] = None) -> Path:
    """Convert ``src`` (upstream dir/.pth, MLX dir or hub id) into a new directory ``dst``."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")
    if to not in ("mlx", "upstream"):
        raise CheckpointError(f"unknown target format {to!r} (choose mlx or upstream)")
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        raise CheckpointError(f"destination already exists: {dst}")
    path = resolve_path(src)
    fmt = detect_format(path) if path.is_dir() else "upstream"
    if fmt == "mlx":
        if config is not None:
            raise CheckpointError(f"--config applies to upstream checkpoints only; {path} is an MLX directory")
        args, tok = _mlx_header(path, tokenizer)
    else:
        args, tok, directory, files = _upstream_header(path, config, tokenizer)
    if tok is None:
        raise CheckpointError(f"no tokenizer model found for {src} (pass --tokenizer FILE)")
    if fmt == "mlx":
        weights = _mlx_weights(args, path)
    else:
        sd = _upstream_weights(args, directory, files)
    if to == "mlx":
        weights = _cast_all(args, weights, dtype) if fmt == "mlx" else upstream_to_mlx(args, sd, dtype)
        return write_mlx_dir(dst, args, weights, tok, max_shard_bytes=max_shard_bytes)
    if fmt == "mlx":
        sd = mlx_to_upstream(args, weights)
    return write_upstream_dir(dst, args, sd, tok, dtype=UPSTREAM_DTYPES[dtype])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert an upstream Megalodon checkpoint (directory with consolidated*.pth, or a "
                    ".pth file, or a Hugging Face repo id) into an MLX model directory, or back.")
    p.add_argument("src", help="upstream checkpoint dir or .pth file, MLX model dir, or hub repo id")
    p.add_argument("dst", help="new output directory (must not exist)")
    p.add_argument("--dtype", default="float32",
                   help="float32 | bfloat16 | float16 (CEMA, norms and the Q/K affine stay float32)")
    p.add_argument("--to", default="mlx", help="output format: mlx (default) or upstream")
    p.add_argument("--config", default=None, help="model config JSON for a bare .pth state dict")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model to use instead of the checkpoint's")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="quantize linear and embedding weights with MLX (CEMA, norms, Q/K affine stay float32)")
    p.add_argument("--q-bits", type=int, default=4, help="bits per weight with -q: 2, 3, 4, 5, 6 or 8 (default 4)")
    p.add_argument("--q-group-size", type=int, default=64, help="quantization group size: 32, 64 or 128 (default 64)")
    p.add_argument("--mlx-lm", action="store_true",
                   help="also make the MLX directory loadable by mlx-lm (mlx_lm.load(..., trust_remote_code=True) "
                        "and its CLIs with --trust-remote-code); checked by loading it with mlx-lm before it is "
                        "written (needs mlx-lm installed)")
    return p


@contextmanager
def _spinner(message: str) -> Iterator[None]:
    """A rich status spinner on an interactive stderr; nothing otherwise."""
    try:
        if not sys.stderr.isatty():
            raise ImportError
        from rich.console import Console
    except ImportError:
        yield
        return
    with Console(stderr=True).status(message):
        yield


def _convert_quantized(a) -> Path:
    """convert -q: convert into a temporary MLX directory, then quantize it with MLX into DST."""
    from .quantize import QUANT_BITS, QUANT_GROUP_SIZES
    if a.to != "mlx":
        raise CheckpointError("-q writes MLX directories only (drop --to upstream)")
    if a.q_bits not in QUANT_BITS:
        raise CheckpointError(f"--q-bits must be one of {', '.join(map(str, QUANT_BITS))}, got {a.q_bits}")
    if a.q_group_size not in QUANT_GROUP_SIZES:
        raise CheckpointError(f"--q-group-size must be one of {', '.join(map(str, QUANT_GROUP_SIZES))}, "
                              f"got {a.q_group_size}")
    dst = Path(a.dst)
    if dst.exists() or dst.is_symlink():
        raise CheckpointError(f"destination already exists: {dst}")
    staging = dst.parent / f".{dst.name}.unquantized-{uuid.uuid4().hex[:8]}"
    try:
        with _spinner(f"converting {a.src}"):
            convert(a.src, staging, dtype=a.dtype, config=a.config, tokenizer=a.tokenizer)
        with _spinner(f"quantizing to {a.q_bits} bits -> {dst}"):
            from .quantize import quantize_directory
            return quantize_directory(staging, dst, a.q_bits, a.q_group_size)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _convert_for_mlx_lm(a) -> Path:
    """convert --mlx-lm: convert (and quantize) into a staging directory, then write DST with
    mlx_lm_compat, which checks the result through mlx-lm before DST appears."""
    from .mlx_lm_compat import make_mlx_lm_loadable
    if a.to != "mlx":
        raise CheckpointError("--mlx-lm writes MLX directories only (drop --to upstream)")
    dst = Path(a.dst)
    if dst.exists() or dst.is_symlink():
        raise CheckpointError(f"destination already exists: {dst}")
    staging = dst.parent / f".{dst.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        _convert_one(argparse.Namespace(**{**vars(a), "dst": str(staging), "mlx_lm": False}))
        with _spinner(f"checking with mlx-lm -> {dst}"):
            return make_mlx_lm_loadable(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _convert_one(a) -> Path:
    if a.mlx_lm:
        return _convert_for_mlx_lm(a)
    if a.quantize:
        return _convert_quantized(a)
    with _spinner(f"converting {a.src} -> {a.dst}"):
        return convert(a.src, a.dst, dtype=a.dtype, to=a.to, config=a.config, tokenizer=a.tokenizer)


def main(argv: Optional[List[str]] = None) -> int:
    from .mlx_lm_compat import CompatError
    a = _parser().parse_args(argv)
    try:
        dst = _convert_one(a)
    except (CheckpointError, TokenizerError, ConfigError, CompatError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {_why(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
