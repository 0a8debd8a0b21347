"""Build the real CLIP BPE tokenizer offline from the vocabulary that ships inside ``open_clip``.

OpenAI CLIP's byte-level BPE (``bpe_simple_vocab_16e6.txt.gz``: 48,894 merges, vocabulary of 49,408 =
256 bytes + 256 ``</w>`` bytes + merges + ``<|startoftext|>`` + ``<|endoftext|>``) is rebuilt as the ``vocab.json`` /
``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads. Only the pretraining script needs this (the embedded
model ships its tokenizer files); ``open_clip_torch`` can be installed with ``pip install --no-deps open_clip_torch``
because only its data file is read (importing ``open_clip`` would need torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte → printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def open_clip_bpe_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip`` package.

    Raises:
        FileNotFoundError: if open_clip is not installed (with the command that installs it).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed; run `pip install --no-deps open_clip_torch` "
                                "(only its BPE vocabulary file is used)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the open_clip installation")
    return path


def write_clip_tokenizer_files(out_dir: str | os.PathLike, model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of the CLIP tokenizer into ``out_dir``.

    Args:
        out_dir: destination folder (created).
        model_max_length: padded/truncated prompt length in tokens (CLIP uses 77; a tiny model may use fewer).

    Returns:
        ``out_dir`` as a Path; ``transformers.CLIPTokenizer.from_pretrained(out_dir)`` loads it.
    """
    merges = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in merges[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    cfg = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True, "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return out
