"""Train a SentencePiece tokenizer on a corpus (plain-text files or jsonl ``{"text": ...}``).

    python -m mlx_megalodon.train_tokenizer --input FILES... --vocab-size 8000 --output tokenizer.model

The model keeps text exactly (identity normalization, whitespace kept, no dummy prefix), falls back
to bytes for anything unseen (byte_fallback), and has unk 0, bos 1, eos 2 and no pad piece, as
upstream Megalodon's tokenizer rules expect. Documents are fed to the trainer in pieces of whole
lines that keep their newlines, so pieces such as ``):\\n`` or runs of indentation are learnt.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

from .data import DataError, load_documents

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
MIN_VOCAB = 256 + 3 + 1  # byte pieces + unk/bos/eos + at least one learnt piece


class TokenizerTrainingError(ValueError):
    pass


def text_pieces(texts: Iterable[str], max_bytes: int = 2048) -> Iterator[str]:
    """Split each text into runs of whole lines (newlines kept) of at most about ``max_bytes``;
    a single longer line is cut (SentencePiece drops sentences over max_sentence_length)."""
    for text in texts:
        buf: List[str] = []
        n = 0
        for line in text.splitlines(keepends=True):
            while len(line.encode("utf-8", "surrogatepass")) > max_bytes:
                cut = max_bytes // 4  # characters: at most 4 UTF-8 bytes each
                if buf:
                    yield "".join(buf)
                    buf, n = [], 0
                yield line[:cut]
                line = line[cut:]
            size = len(line.encode("utf-8", "surrogatepass"))
            if n + size > max_bytes and buf:
                yield "".join(buf)
                buf, n = [], 0
            buf.append(line)
            n += size
        if buf:
            yield "".join(buf)


def train_tokenizer(texts: Sequence[str], vocab_size: int, output, model_type: str = "bpe",
                    character_coverage: float = 0.9999, num_threads: Optional[int] = None,
                    input_sentence_size: int = 2_000_000, max_piece_bytes: int = 2048,
                    seed_sentencepiece_size: int = 1_000_000, verbose: bool = False) -> Path:
    """Train on ``texts`` and write the serialized model to ``output`` (atomically); returns its path."""
    import sentencepiece as spm
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise TokenizerTrainingError(f"--vocab-size must be an integer >= {MIN_VOCAB} (256 byte pieces + "
                                     f"unk/bos/eos + learnt pieces), got {vocab_size}")
    if model_type not in ("bpe", "unigram"):
        raise TokenizerTrainingError(f"--model-type must be bpe or unigram, got {model_type!r}")
    if not 0.9 <= character_coverage <= 1.0:
        raise TokenizerTrainingError(f"--character-coverage must be in [0.9, 1], got {character_coverage}")
    if not texts:
        raise TokenizerTrainingError("no training text")
    output = Path(output)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=text_pieces(texts, max_piece_bytes), model_writer=buf,
            vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=4 * max_piece_bytes + 16, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, seed_sentencepiece_size=seed_sentencepiece_size,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=0 if verbose else 2)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        if "Vocabulary size" in msg or "vocab_size" in msg:
            raise TokenizerTrainingError(f"--vocab-size {vocab_size} does not fit this corpus: {msg}") from None
        raise TokenizerTrainingError(f"SentencePiece training failed: {msg}") from None
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return output


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="megalodon-train-tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text files, .jsonl files ({\"text\": ...} per line) or directories of them")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--output", default="tokenizer.model", help="where to write the SentencePiece model")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--character-coverage", type=float, default=0.9999)
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="most text pieces the trainer samples from the corpus")
    p.add_argument("--text-key", default="text", help="field holding the text in jsonl records")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prog = "megalodon-train-tokenizer"
    try:
        docs = load_documents(args.input, text_key=args.text_key)
        out = train_tokenizer([d.text for d in docs], args.vocab_size, args.output, args.model_type,
                              args.character_coverage, args.num_threads, args.input_sentence_size,
                              verbose=args.verbose)
    except (DataError, TokenizerTrainingError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    from .tokenizer import Tokenizer
    tok = Tokenizer(out)
    print(f"wrote {out}: {tok.vocab_size} pieces (bos {tok.bos_id}, eos {tok.eos_id}), "
          f"trained on {len(docs)} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
