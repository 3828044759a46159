"""Training data: documents from text / jsonl files, tokenized once, packed into fixed-length rows.

Pipeline::

    documents = load_documents(paths)                     # [Document(source, line, text)]
    stream = TokenStream.from_texts(tokenizer, [d.text for d in documents])
    train = PackedDataset(stream, seq_len)                # rows of seq_len + 1 tokens
    for batch in BatchIterator(train, batch_size, seed):  # endless, resumable (state_dict)
        batch.inputs, batch.targets, batch.mask, batch.segment_ids   # B x L numpy arrays

Every document is ``[BOS] text [EOS]`` (whichever of the two the tokenizer has) and documents are
concatenated into one token stream; row ``i`` of the packed dataset is stream[i·L : i·L + L + 1], so
no token is wasted and a row may span several documents. ``segment_ids`` numbers the documents
inside each row (0, 1, 2, ...), for models that reset their state at document boundaries.

Imports numpy (and sentencepiece through the tokenizer), never MLX.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_KEY = "text"
# Number of documents handed to SentencePiece per encode call (bounds the Python lists alive).
ENCODE_BATCH = 512


class DataError(ValueError):
    """Unusable training data; the message is one line naming the file (and line)."""


@dataclass
class Document:
    source: str      # file it came from
    line: int        # 1-based line of a jsonl record; 0 for a whole text file
    text: str


# ----------------------------------------------------------------------------- reading documents
def expand_paths(paths: Iterable[PathLike]) -> List[Path]:
    """Files as given; a directory stands for every regular, non-hidden file below it (sorted)."""
    out: List[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not files:
                raise DataError(f"{p}: directory holds no data files")
            out.extend(files)
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise DataError(f"{p}: not a regular file")
        else:
            raise DataError(f"{p}: no such file or directory")
    if not out:
        raise DataError("no data files given")
    return out


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def read_documents(path: PathLike, text_key: str = TEXT_KEY, max_chars: Optional[int] = None
                   ) -> List[Document]:
    """The documents of one file: every line of a ``.jsonl`` file is ``{"text": ...}`` (blank lines
    are skipped); any other file is one plain-text document. Raises DataError (one line, naming the
    file and line) for an empty file, a malformed record, or a document over ``max_chars``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    text = _decode(path, raw)
    docs: List[Document] = []

    def check_len(doc_text: str, line: int) -> None:
        if max_chars is not None and len(doc_text) > max_chars:
            where = f"{path}:{line}" if line else str(path)
            raise DataError(f"{where}: document of {len(doc_text)} characters exceeds --max-doc-chars "
                            f"{max_chars}")

    if path.suffix.lower() not in JSONL_SUFFIXES:
        check_len(text, 0)
        return [Document(str(path), 0, text)]
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{i}: expected a JSON object with a '{text_key}' field, "
                            f"got {type(record).__name__}")
        if text_key not in record:
            keys = ", ".join(map(repr, list(record)[:5])) or "none"
            raise DataError(f"{path}:{i}: no '{text_key}' field (fields: {keys})")
        value = record[text_key]
        if not isinstance(value, str):
            raise DataError(f"{path}:{i}: field '{text_key}' must be a string, got {type(value).__name__}")
        if not value:
            raise DataError(f"{path}:{i}: field '{text_key}' is empty")
        check_len(value, i)
        docs.append(Document(str(path), i, value))
    if not docs:
        raise DataError(f"{path}: no documents (only blank lines)")
    return docs


def load_documents(paths: Iterable[PathLike], text_key: str = TEXT_KEY, max_chars: Optional[int] = None
                   ) -> List[Document]:
    docs: List[Document] = []
    for f in expand_paths(paths):
        docs.extend(read_documents(f, text_key, max_chars))
    return docs


# ----------------------------------------------------------------------------- tokenizing
def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def encode_texts(tokenizer, texts: Sequence[str], num_threads: Optional[int] = None) -> List[np.ndarray]:
    """SentencePiece ids of every text (no BOS/EOS), encoded in batches on all cores."""
    sp = tokenizer.sp_model
    threads = num_threads or os.cpu_count() or 1
    dtype = _token_dtype(tokenizer.vocab_size)
    out: List[np.ndarray] = []
    for start in range(0, len(texts), ENCODE_BATCH):
        batch = list(texts[start: start + ENCODE_BATCH])
        for ids in sp.encode(batch, num_threads=threads):
            out.append(np.asarray(ids, dtype=dtype))
    return out


class TokenStream:
    """Documents as one flat token array plus the offset where each document starts."""

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, vocab_size: int):
        self.tokens = tokens
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        self.vocab_size = int(vocab_size)

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str], num_threads: Optional[int] = None) -> "TokenStream":
        if not texts:
            raise DataError("no documents to tokenize")
        ids = encode_texts(tokenizer, texts, num_threads)
        dtype = _token_dtype(tokenizer.vocab_size)
        bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
        eos = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
        extra = len(bos) + len(eos)
        lengths = np.array([len(a) + extra for a in ids], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        tokens = np.empty(int(lengths.sum()), dtype=dtype)
        for s, a in zip(starts, ids):
            pos = int(s)
            if bos:
                tokens[pos] = bos[0]
                pos += 1
            tokens[pos: pos + len(a)] = a
            if eos:
                tokens[pos + len(a)] = eos[0]
        return cls(tokens, starts, tokenizer.vocab_size)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.doc_starts.shape[0])

    def split_tail(self, fraction: float) -> Tuple["TokenStream", "TokenStream"]:
        """(head, tail): the last ``fraction`` of the tokens held out, cut at a document start when
        there is one in the tail half of the cut, else mid-document."""
        if not 0.0 < fraction < 1.0:
            raise DataError(f"validation fraction must be in (0, 1), got {fraction}")
        cut = int(round(len(self) * (1.0 - fraction)))
        i = int(np.searchsorted(self.doc_starts, cut, side="left"))
        if i < self.num_documents and self.doc_starts[i] - cut < len(self) * fraction / 2 and self.doc_starts[i] > 0:
            cut = int(self.doc_starts[i])
        head_starts = self.doc_starts[self.doc_starts < cut]
        tail_starts = self.doc_starts[self.doc_starts >= cut] - cut
        if tail_starts.size == 0 or tail_starts[0] != 0:
            tail_starts = np.concatenate([[0], tail_starts])
        return (TokenStream(self.tokens[:cut], head_starts, self.vocab_size),
                TokenStream(self.tokens[cut:], tail_starts, self.vocab_size))

    # -- persistence (a .npz cache of a tokenized corpus)
    def save(self, path: PathLike) -> None:
        """Atomic: written to a temporary file in the same folder, then renamed."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, tokens=self.tokens, doc_starts=self.doc_starts,
                         vocab_size=np.array(self.vocab_size, dtype=np.int64))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: PathLike) -> "TokenStream":
        with np.load(path) as z:
            return cls(z["tokens"], z["doc_starts"], int(z["vocab_size"]))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(str(self.tokens.dtype).encode())
        h.update(np.ascontiguousarray(self.tokens).tobytes())
        h.update(np.ascontiguousarray(self.doc_starts).tobytes())
        return h.hexdigest()[:16]


def corpus_key(files: Sequence[PathLike], tokenizer_path: PathLike, extra: str = "") -> str:
    """Cache key for a tokenized corpus: the tokenizer's bytes and each file's path, size, mtime."""
    h = hashlib.sha256(Path(tokenizer_path).read_bytes())
    h.update(extra.encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def load_token_stream(paths: Iterable[PathLike], tokenizer, cache_dir: Optional[PathLike] = None,
                      text_key: str = TEXT_KEY, max_chars: Optional[int] = None) -> TokenStream:
    """Read, tokenize and pack the documents of ``paths``; with ``cache_dir`` the result is kept
    as ``tokens-<key>.npz`` and reused while neither the files nor the tokenizer change."""
    files = expand_paths(paths)
    cache = None
    if cache_dir is not None:
        key = corpus_key(files, tokenizer.path, f"{text_key}\0{max_chars}")
        cache = Path(cache_dir) / f"tokens-{key}.npz"
        if cache.is_file():
            try:
                return TokenStream.load(cache)
            except Exception:
                pass  # a damaged cache is rebuilt
    docs: List[Document] = []
    for f in files:
        docs.extend(read_documents(f, text_key, max_chars))
    stream = TokenStream.from_texts(tokenizer, [d.text for d in docs])
    if cache is not None:
        stream.save(cache)
    return stream


# ----------------------------------------------------------------------------- packing and batching
@dataclass
class Batch:
    inputs: np.ndarray       # B x L int32
    targets: np.ndarray      # B x L int32
    mask: np.ndarray         # B x L float32: 1 where the target counts in the loss
    segment_ids: np.ndarray  # B x L int32: document number inside each row, from 0
    # Counted on the host when the fields become MLX arrays (resident): summing an MLX mask would
    # make the training loop wait until the device has finished every step queued before it.
    token_count: Optional[int] = None

    @property
    def num_tokens(self) -> int:
        return self.token_count if self.token_count is not None else int(self.mask.sum())

    def resident(self) -> "Batch":
        """The same batch as MLX arrays, converted once (the Trainer passes MLX arrays through),
        with its token count kept (``token_count``). A step that converts numpy arrays makes new
        host-visible MLX buffers; MLX's CUDA allocator may serve those from a cached device buffer
        with a copy into managed memory (a candidate cost of the loop's per-step conversion on the
        H200, not confirmed: BENCHMARKS.md, ninth and tenth sessions)."""
        import mlx.core as mx
        return Batch(*(v if isinstance(v, mx.array) else mx.array(v)
                       for v in (self.inputs, self.targets, self.mask, self.segment_ids)),
                     token_count=self.num_tokens)


class PackedDataset:
    """Rows of ``seq_len`` inputs and their next-token targets cut from a TokenStream."""

    def __init__(self, stream: TokenStream, seq_len: int):
        if seq_len <= 0:
            raise DataError(f"sequence length must be positive, got {seq_len}")
        self.stream = stream
        self.seq_len = int(seq_len)
        self.num_rows = max(0, (len(stream) - 1) // self.seq_len)

    def __len__(self) -> int:
        return self.num_rows

    @property
    def num_tokens(self) -> int:
        """Target tokens over all rows."""
        return self.num_rows * self.seq_len

    def rows(self, indices: Sequence[int]) -> Batch:
        L = self.seq_len
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"row index out of range [0, {self.num_rows})")
        pos = idx[:, None] * L + np.arange(L + 1, dtype=np.int64)[None, :]     # B x (L+1)
        window = self.stream.tokens[pos].astype(np.int32)
        doc = np.searchsorted(self.stream.doc_starts, pos[:, :-1], side="right") - 1
        segment_ids = (doc - doc[:, :1]).astype(np.int32)
        return Batch(window[:, :-1], window[:, 1:], np.ones((idx.size, L), dtype=np.float32), segment_ids)


class BatchIterator:
    """Endless batches of ``batch_size`` rows: rows are drawn from a sequence of epoch permutations
    (epoch ``e`` shuffled with seed (seed, e)); ``position`` counts rows drawn so far, so the state
    is one integer and resuming from it reproduces the same batches exactly.

    Data parallelism: ``batch_size`` is the global batch and ``world_size`` ranks share it; each
    draws the same global rows and ``next()`` returns rank ``rank``'s rows ``rank::world_size``.
    ``position`` counts global rows, so a state saved with one number of ranks resumes with any
    other that keeps the global batch."""

    def __init__(self, dataset: PackedDataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                 position: int = 0, rank: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise DataError(f"no training rows: the data has {len(dataset.stream)} tokens, fewer than "
                            f"sequence length + 1 = {dataset.seq_len + 1}")
        if batch_size <= 0:
            raise DataError(f"batch size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} of {world_size} ranks is not a valid shard")
        if batch_size % world_size:
            raise DataError(f"global batch size {batch_size} is not divisible by the {world_size} ranks")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.position = int(position)
        self.rank, self.world_size = int(rank), int(world_size)
        self._perm_epoch = -1
        self._perm: Optional[np.ndarray] = None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = len(self.dataset)
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                          else np.arange(n))
            self._perm_epoch = epoch
        return self._perm

    @property
    def epoch(self) -> float:
        return self.position / len(self.dataset)

    def next_indices(self) -> np.ndarray:
        n = len(self.dataset)
        out = []
        pos = self.position
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos, n)
            take = min(self.batch_size - len(out), n - offset)
            out.extend(self._order(epoch)[offset: offset + take].tolist())
            pos += take
        self.position = pos
        return np.asarray(out, dtype=np.int64)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.dataset.rows(shard_rows(self.next_indices(), self.rank, self.world_size))

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "num_rows": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "shuffle", "num_rows"):
            here = self.state_dict()[key]
            if key in state and state[key] != here:
                raise DataError(f"data iterator state does not match: {key} was {state[key]}, now {here}")
        self.position = int(state["position"])


def shard_rows(indices: np.ndarray, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Rank ``rank``'s rows of a global batch: ``indices[rank::world_size]``."""
    return indices if world_size == 1 else indices[rank::world_size]


def iterate_batches(dataset: PackedDataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                    loop: bool = True, position: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
    """Batches of ``dataset``: endless and shuffled per epoch (``loop``), or one ordered pass whose
    last batch may be smaller (``loop=False``, for evaluation). With ``world_size`` > 1,
    ``batch_size`` is the global batch and each yielded batch holds rank ``rank``'s rows of it
    (in an evaluation pass a rank's share of the short last batch may be empty: zero rows)."""
    if loop:
        yield from BatchIterator(dataset, batch_size, seed, shuffle, position, rank, world_size)
        return
    order = BatchIterator(dataset, 1, seed, shuffle)._order(0) if shuffle else np.arange(len(dataset))
    for start in range(0, len(dataset), batch_size):
        yield dataset.rows(shard_rows(order[start: start + batch_size], rank, world_size))
