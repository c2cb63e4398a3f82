#!/usr/bin/env python3
"""Write a CLIP BPE tokenizer folder (the layout of Stable Diffusion's `tokenizer/`) without the network.

The vocabulary is OpenAI CLIP's, as `open_clip_torch` ships it (`bpe_simple_vocab_16e6.txt.gz`): the
same 49 408 tokens and 48 894 merges as `openai/clip-vit-large-patch14`'s `vocab.json` and
`merges.txt`, which Stable Diffusion 1.x models carry. The ids are built the way CLIP builds them:
the 256 byte symbols, the same with `</w>`, one token per merge in order, then the two specials.

    python models/tools/clip_vocab.py OUT_DIR

writes OUT_DIR/vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json.
"""

import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode():
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def bpe_file():
    import open_clip  # the package ships the vocabulary file

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def main(out: Path):
    lines = gzip.open(bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
