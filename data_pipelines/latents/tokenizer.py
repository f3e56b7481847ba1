"""A real CLIP BPE tokenizer built without a model hub.

The CLIP byte-pair vocabulary (``bpe_simple_vocab_16e6.txt.gz``, MIT, OpenAI) ships in
``data_pipelines/assets/clip_bpe``. It converts to the ``vocab.json`` / ``merges.txt`` pair that
``transformers.CLIPTokenizer`` reads, exactly as OpenAI's ``SimpleTokenizer`` builds its tables:
256 byte symbols, the same with the end-of-word mark, 48,894 merges, and the two special tokens
(49,408 entries in all).

SD 2.x's tokenizer (OpenCLIP's vocabulary, the same BPE) differs only in padding: diffusers'
``stable-diffusion-2`` tokenizer pads with ``"!"`` (id 0), as OpenCLIP's own tokenizer pads with 0,
where SD 1.x's pads with the end token (``pad_token``).
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_MAX_LENGTH = 77
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-unicode table of GPT-2 and CLIP."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Read the shipped BPE file and build CLIP's vocabulary and merge list.

    Returns:
        ``(vocab, merges)``: token -> id (49,408 entries) and the merges as ``"a b"`` strings.
    """
    asset = resources.files("data_pipelines") / "assets" / "clip_bpe" / CLIP_BPE_FILE
    with asset.open("rb") as handle:
        lines = gzip.decompress(handle.read()).decode("utf-8").split("\n")
    merges = lines[1 : CLIP_NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [START_TOKEN, END_TOKEN]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{asset}: built {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}")
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(max_length: int = CLIP_MAX_LENGTH, pad_token: str = END_TOKEN) -> CLIPTokenizer:
    """Build CLIP's tokenizer (SD 1.x's; SD 2.x's with ``pad_token="!"``) from the shipped vocabulary."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split()) for m in merges],
        model_max_length=max_length,
        bos_token=START_TOKEN,
        eos_token=END_TOKEN,
        unk_token=END_TOKEN,
        pad_token=pad_token,
    )


def save_clip_tokenizer(out_dir: str | Path, max_length: int = CLIP_MAX_LENGTH, pad_token: str = END_TOKEN) -> Path:
    """Write the tokenizer in diffusers' layout (``tokenizer/`` of a pipeline folder)."""
    out = Path(out_dir)
    build_clip_tokenizer(max_length, pad_token).save_pretrained(out)
    # The slow-tokenizer files too, for tools that do not read tokenizer.json.
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out
