#!/usr/bin/env python3
"""Build diffusers-style CLIP tokenizer folders from open_clip's BPE file.

The vocabulary is the one OpenAI CLIP ships as `bpe_simple_vocab_16e6.txt.gz`
(bundled by open_clip_torch), turned into the four files a diffusers
`tokenizer/` folder holds, laid out like the Hugging Face hub copies
(openai/clip-vit-large-patch14 for SD 1.x, stabilityai/stable-diffusion-2-1
for SD 2.x):

  vocab.json               token -> id, ids as CLIP's SimpleTokenizer assigns
  merges.txt               "#version: 0.2" header + one merge per line, by rank
  special_tokens_map.json
  tokenizer_config.json

The vocabulary construction copies open_clip/tokenizer.py `SimpleTokenizer`:
merges = lines[1 : 49152 - 256 - 2 + 1]; vocab = the 256 bytes_to_unicode
chars, the same with "</w>", one token per merge, then the two specials
(named "<|startoftext|>"/"<|endoftext|>" as in the Hugging Face vocab,
where open_clip says "<start_of_text>"/"<end_of_text>"; the ids are the same).

Outputs:
  weights/tiny-shapes/tokenizer/      SD 1.x style: pad with EOS (all four files)
  tests/fixtures/tokenizer_sd2/       SD 2.x style: pad with "!" (id 0); only the
                                      two JSON files, the vocabulary is shared

Then it checks that transformers' CLIPTokenizer loads both folders and gives
the same ids as open_clip's SimpleTokenizer on sample text.

Usage: HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_tokenizer.py
"""

import gzip
import json
import os
import shutil
import sys
import tempfile

import open_clip
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode, default_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD1_DIR = os.path.join(ROOT, "weights", "tiny-shapes", "tokenizer")
SD2_DIR = os.path.join(ROOT, "tests", "fixtures", "tokenizer_sd2")

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def added_token(content):
    # The serialised AddedToken form the hub's CLIP tokenizer files use.
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def build_vocab():
    """Returns (vocab dict token->id, merges list of 'a b' strings)."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += [BOS, EOS]
    assert len(vocab) == 49408, len(vocab)
    encoder = dict(zip(vocab, range(len(vocab))))
    assert len(encoder) == 49408, "duplicate tokens in the CLIP vocabulary"
    return encoder, [" ".join(p) for p in pairs]


def special_tokens_map(pad_token):
    return {
        "bos_token": added_token(BOS),
        "eos_token": added_token(EOS),
        "pad_token": pad_token,
        "unk_token": added_token(EOS),
    }


def tokenizer_config(pad_token):
    # Like the hub's SD tokenizer_config.json (which transformers 4.x wrote).
    tok = lambda c: {"__type": "AddedToken", **added_token(c)}  # noqa: E731
    return {
        "add_prefix_space": False,
        "bos_token": tok(BOS),
        "do_lower_case": True,
        "eos_token": tok(EOS),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": tok(EOS),
    }


def write_json(path, obj, indent=2):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def write_folders():
    encoder, merges = build_vocab()
    os.makedirs(SD1_DIR, exist_ok=True)
    os.makedirs(SD2_DIR, exist_ok=True)
    # Compact, id order, as the hub's vocab.json.
    with open(os.path.join(SD1_DIR, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    with open(os.path.join(SD1_DIR, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in merges:
            f.write(m + "\n")
    write_json(os.path.join(SD1_DIR, "special_tokens_map.json"), special_tokens_map(EOS))
    write_json(os.path.join(SD1_DIR, "tokenizer_config.json"), tokenizer_config(EOS))
    # SD 2.x: stabilityai/stable-diffusion-2-1/tokenizer has pad "!" in
    # special_tokens_map.json but "<|endoftext|>" in tokenizer_config.json;
    # the map wins (pad id 0). Kept that way to test the precedence.
    write_json(os.path.join(SD2_DIR, "special_tokens_map.json"), special_tokens_map("!"))
    write_json(os.path.join(SD2_DIR, "tokenizer_config.json"), tokenizer_config(EOS))


def sd2_full_dir(tmp):
    """A full SD 2.x folder (SD 1.x vocab + SD 2.x JSON) for transformers."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(SD1_DIR, name), tmp)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(SD2_DIR, name), tmp)
    return tmp


SAMPLES = [
    "a photograph of an astronaut riding a horse",
    "A Painting of a CAT, by Greg Rutkowski!!! 1234 don't it's we'll",
    "(masterpiece:1.2), best quality, <lora:foo:0.8> [dog|cat]",
    "café naïve résumé",
    "  multiple   spaces\tand\nnewlines  ",
]


def check():
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    tok1 = CLIPTokenizer.from_pretrained(SD1_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        tok2 = CLIPTokenizer.from_pretrained(sd2_full_dir(tmp))
    assert tok1.bos_token_id == 49406 and tok1.eos_token_id == 49407, (tok1.bos_token_id, tok1.eos_token_id)
    assert tok1.pad_token_id == 49407, tok1.pad_token_id
    assert tok2.pad_token_id == 0, tok2.pad_token_id
    assert tok1.model_max_length == 77 and tok2.model_max_length == 77
    for text in SAMPLES:
        ref = simple.encode(text)
        ids = tok1(text, add_special_tokens=False)["input_ids"]
        assert ids == ref, (text, ids, ref)
        ids2 = tok2(text, add_special_tokens=False)["input_ids"]
        if "!" not in text:
            assert ids2 == ref, (text, ids2, ref)
        full = tok1(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        ref_full = simple(text)[0].tolist()  # open_clip pads with 0
        assert full[: len(ids) + 2] == ref_full[: len(ids) + 2], (text, full, ref_full)
    # With pad "!" the SD 2.x tokenizer makes "!" a special token: it is cut
    # out before BPE, so "!!!" is three pad ids where open_clip (and SD 1.x)
    # has one BPE token. That is what diffusers feeds SD 2.x, so we keep it.
    assert tok2("wow!!!", add_special_tokens=False)["input_ids"] == simple.encode("wow") + [0, 0, 0]
    assert tok1("wow!!!", add_special_tokens=False)["input_ids"] == simple.encode("wow!!!")
    print(f"ok: transformers {__import__('transformers').__version__} CLIPTokenizer == open_clip "
          f"{open_clip.__version__} SimpleTokenizer on {len(SAMPLES)} samples; pad ids 49407 / 0")


if __name__ == "__main__":
    write_folders()
    check()
    sys.exit(0)
