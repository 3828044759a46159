"""SentencePiece tokenizer with upstream Megalodon's id rules. Imports no array framework.

Upstream (megalodon/data/tokenizer.py) counts ``additional_vocab_size`` placeholder ids after the
SentencePiece pieces; when the SentencePiece model has no BOS/EOS/PAD piece and there are
placeholder ids, those special ids are taken from the placeholders in the order BOS, EOS, PAD.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional, Union

PathLike = Union[str, Path]


class TokenizerError(ValueError):
    """A tokenizer model that is missing, unreadable or not a SentencePiece model."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Tokenizer:
    def __init__(self, path: PathLike, additional_vocab_size: int = 0):
        self.path = Path(path)
        if isinstance(additional_vocab_size, bool) or not isinstance(additional_vocab_size, int) \
                or additional_vocab_size < 0:
            raise TokenizerError(f"{self.path}: additional_vocab_size must be a non-negative integer, "
                                 f"got {additional_vocab_size!r}")
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer model not found: {self.path}")
        try:
            from sentencepiece import SentencePieceProcessor
        except ImportError as e:  # pragma: no cover - sentencepiece is a dependency
            raise TokenizerError(f"{self.path}: sentencepiece is not installed ({e})") from e
        try:
            data = self.path.read_bytes()
            sp = SentencePieceProcessor()
            sp.LoadFromSerializedProto(data)
            n = sp.vocab_size()
        except Exception as e:  # OSError, RuntimeError from a malformed protobuf, ...
            raise TokenizerError(f"{self.path}: not a readable SentencePiece model "
                                 f"({_one_line(type(e).__name__ + ': ' + str(e), 160)})") from e
        if n <= 0:
            raise TokenizerError(f"{self.path}: SentencePiece model has no pieces")
        self.sp_model = sp
        self.sp_vocab_size = n
        self.additional_vocab_size = additional_vocab_size
        self.vocab_size = n + additional_vocab_size

        # Upstream's special-id rule, resolved in the order its constructor logs them.
        next_id = n
        ids = {}
        for name, sp_id in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id())):
            if sp_id != -1 or additional_vocab_size == 0:
                ids[name] = sp_id
            elif next_id < self.vocab_size:
                ids[name] = next_id
                next_id += 1
            else:
                ids[name] = -1
        self.bos_id: int = ids["bos"]
        self.eos_id: int = ids["eos"]
        self.pad_id: int = ids["pad"]

    @property
    def n_words(self) -> int:
        """Upstream's name for the vocabulary size."""
        return self.vocab_size

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = list(self.sp_model.encode(text))
        if bos and self.bos_id >= 0:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id >= 0:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Union[int, Iterable[int]], cut_at_eos: bool = False) -> str:
        """Text of ``ids``; ids outside the SentencePiece vocabulary (placeholders) are skipped.
        With ``cut_at_eos`` everything after the first EOS is dropped (upstream's default)."""
        if isinstance(ids, int):
            ids = [ids]
        out = []
        for t in (ids.tolist() if hasattr(ids, "tolist") else ids):
            t = int(t)
            if cut_at_eos and t == self.eos_id:
                break
            if 0 <= t < self.sp_vocab_size:
                out.append(t)
        return self.sp_model.decode(out)

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        return self.sp_model.id_to_piece(i) if 0 <= i < self.sp_vocab_size else f"<extra_{i}>"

    def __repr__(self) -> str:
        return (f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id})")


def find_tokenizer_file(directory: PathLike) -> Optional[Path]:
    """``tokenizer.model`` in ``directory``, else its only ``*.model`` file, else None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    p = d / "tokenizer.model"
    if p.is_file():
        return p
    models = sorted(q for q in d.glob("*.model") if q.is_file())
    return models[0] if len(models) == 1 else None


def load_tokenizer(path: PathLike, additional_vocab_size: Optional[int] = None) -> Tokenizer:
    """A Tokenizer from a ``.model`` file or a model directory (MLX or upstream layout).

    For a directory, ``additional_vocab_size`` (when not given) is read from an upstream
    config.json's tokenizer section, or else is what the model's vocab_size adds to the
    SentencePiece vocabulary (0 if the model's vocabulary is not larger)."""
    p = Path(path)
    if p.is_dir():
        f = find_tokenizer_file(p)
        if f is None:
            raise TokenizerError(f"no tokenizer.model (or single *.model file) in {p}")
        if additional_vocab_size is None:
            additional_vocab_size = _additional_from_config(p / "config.json", f)
        p = f
    return Tokenizer(p, additional_vocab_size or 0)


def _additional_from_config(config_path: Path, model_path: Path) -> int:
    import json
    try:
        cfg = json.loads(config_path.read_text())
    except Exception:
        return 0
    if not isinstance(cfg, dict):
        return 0
    tok = cfg.get("tokenizer")
    if isinstance(tok, dict) and isinstance(tok.get("additional_vocab_size"), int) \
            and not isinstance(tok.get("additional_vocab_size"), bool) and tok["additional_vocab_size"] >= 0:
        return tok["additional_vocab_size"]
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else cfg
    vocab = model.get("vocab_size")
    if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0:
        return max(0, vocab - Tokenizer(model_path).sp_vocab_size)
    return 0
