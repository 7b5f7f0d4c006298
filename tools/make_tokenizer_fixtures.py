#!/usr/bin/env python3
"""Reference token ids for tests/tokenizer.rs, from transformers' CLIPTokenizer.

Writes tests/fixtures/tokenizer_cases.json: for each prompt, the unpadded ids
(`tok(text)["input_ids"]`, BOS + tokens + EOS, no truncation) and the ids
diffusers feeds the text encoder (`padding="max_length", truncation=True,
max_length=77`), for both pad styles:

  sd1: weights/tiny-shapes/tokenizer/        (pad "<|endoftext|>" = 49407)
  sd2: same vocab + tests/fixtures/tokenizer_sd2/*.json  (pad "!" = 0)

Since transformers 5, `CLIPTokenizer` is the `tokenizers`-backed (formerly
"fast") class; the pure-Python one is gone. If a `CLIPTokenizerFast` or a
slow class exists (transformers 4.x), it is run too and must agree, except
where the 4.x slow class is known to differ (it runs BasicTokenizer or ftfy
first: CJK chars split one by one, control chars dropped); those are
reported, not stored.

With --slow-transformers DIR (a transformers 4.x installed with
`pip install --target DIR transformers==4.57.1 --no-deps`) it instead
compares the stored fixtures with the 4.x pure-Python CLIPTokenizer, with
and without ftfy, and prints the prompts that differ (run in a fresh process:
it imports that transformers in place of the installed one).

With --rust-tables it instead prints the `\\p{L}` and `\\p{N}` code point
ranges, as the `tokenizers` regex engine (Oniguruma) classifies them, in the
Rust form src/tokenizer.rs embeds. They are measured by running the CLIP
pre-tokenizer on every code point, so they match the reference exactly
(Python's own unicodedata may be an older Unicode version).

Usage: HF_HUB_OFFLINE=1 /work/venv/bin/python tools/make_tokenizer_fixtures.py
           [--rust-tables | --slow-transformers DIR]
"""

import json
import os
import shutil
import sys
import tempfile

import transformers
from transformers import CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD1_DIR = os.path.join(ROOT, "weights", "tiny-shapes", "tokenizer")
SD2_DIR = os.path.join(ROOT, "tests", "fixtures", "tokenizer_sd2")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer_cases.json")

CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

LONG = (
    "a highly detailed matte painting of a sprawling cyberpunk city at night, neon lights reflecting "
    "on wet streets, flying cars, towering skyscrapers with holographic advertisements, crowds of people "
    "with umbrellas, steam rising from vents, cinematic lighting, volumetric fog, by syd mead and "
    "simon stalenhag, trending on artstation, 8k, ultra realistic, octane render, unreal engine 5, "
    "sharp focus, intricate details, award winning photograph, dramatic composition"
)

PROMPTS = [
    "",
    " ",
    "a photograph of an astronaut riding a horse",
    "A PHOTOGRAPH OF AN ASTRONAUT RIDING A HORSE",
    "Hello, World! How are you?",
    "(masterpiece:1.2), best quality, ultra-detailed, (1girl:1.1), [blurry:0.5]",
    "<lora:myLora_v2:0.8> portrait, ((smile)), {{{hat}}}",
    "don't it's we'll they're I've I'm she'd DON'T IT'S",
    "'s't're've'm'll'd 'hello' \"quoted\" `backtick`",
    "1234 3.14159 -42 1,000,000 2024-01-01 12:30pm 0x1F",
    "café naïve résumé Ångström façade jalapeño",
    "東京 の 夜景, 北京烤鸭, 서울 야경",
    "emoji 🎨🖌️ 👩‍🚀 🇫🇷 ❤️ ✨✨",
    "ΟΔΟΣ Σίσυφος Москва ПРИВЕТ İstanbul ß ǅ",
    "multiple   spaces\tand\ttabs\nand\nnewlines\r\nand\u00a0nbsp\u3000ideographic",
    "   leading and trailing   ",
    "\n\t\n",
    "<b>bold</b> &amp; <i>italic</i> &lt;tag&gt; <div class=\"x\">hi</div>",
    "https://example.com/path?query=1&b=2#frag user@mail.com",
    "snake_case camelCase kebab-case PascalCase ALLCAPS",
    "!!!",
    "wow!!! amazing!! hi! ! !? ?!",
    "a<|endoftext|>b",
    "<|startoftext|>x<|endoftext|>",
    "a <|ENDOFTEXT|> b <|StartOfText|>",
    "<|startoftext|",
    "...,,,;;;:::---___",
    "$100 50% #hashtag @mention ^caret ~tilde |pipe| \\backslash/",
    "²³ ½ ¾ ① Ⅻ ٣ ४ ๕",
    "control\x00chars\x01here\x7f and\u200bzero\u200dwidth\ufeffbom",
    "mixed 123abc abc123 a1b2c3",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "a close up portrait photo of a cat wearing a tiny wizard hat, studio lighting, 85mm, f/1.8",
    "masterpiece, best quality, highres, extremely detailed CG unity 8k wallpaper",
    "negative: lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit",
    LONG,
    LONG + " " + LONG,
    " ".join(["cat"] * 75),
    " ".join(["cat"] * 76),
    " ".join(["dog"] * 150),
    "the " * 200,
    "Ⓐⓑⓒ ＡＢＣ ｆｕｌｌｗｉｄｔｈ ﬁ ligature",
    "tab\tat\tend\t",
]


def sd2_dir(tmp):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(SD1_DIR, name), tmp)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(SD2_DIR, name), tmp)
    return tmp


def encode(tok, text):
    unpadded = tok(text)["input_ids"]
    padded = tok(text, padding="max_length", truncation=True, max_length=77)["input_ids"]
    assert len(padded) == 77, (text, len(padded))
    return unpadded, padded


def cross_check(name, folder, ref):
    """Other CLIP tokenizer classes in this transformers version, if any."""
    for cls_name, kwargs in (("CLIPTokenizerFast", {}), ("CLIPTokenizer", {"use_fast": False})):
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            continue
        try:
            if kwargs:
                other = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
            else:
                other = cls.from_pretrained(folder)
        except Exception as e:  # noqa: BLE001 - a tool: report and go on
            print(f"  {name}: {cls_name}{kwargs} unavailable: {e}")
            continue
        if type(other) is type(ref):
            continue
        diffs = [t for t in PROMPTS if encode(other, t) != encode(ref, t)]
        print(f"  {name}: {type(other).__name__} differs on {len(diffs)} prompts: {diffs!r}"[:2000])


def rust_tables():
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True)
    classes = {}
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        pieces = [p for p, _ in split.pre_tokenize_str("a" + c + "a " + c + c)]
        if pieces == ["a" + c + "a", c + c]:
            classes[cp] = "L"
        elif pieces == ["a", c, "a", c, c]:
            classes[cp] = "N"
        elif pieces == ["a", "a"]:
            classes[cp] = "S"
            assert c.isspace(), hex(cp)
        else:
            assert pieces == ["a", c, "a", c + c], (hex(cp), pieces)
    for name, cls in (("LETTER", "L"), ("NUMBER", "N")):
        ranges = []
        for cp in sorted(classes):
            if classes[cp] != cls:
                continue
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
        print(f"/// `\\p{{{cls}}}` as the `tokenizers` regex engine sees it: {len(ranges)} ranges.")
        print("#[rustfmt::skip]")
        print(f"const {name}_RANGES: &[(u32, u32)] = &[")
        for i in range(0, len(ranges), 6):
            row = " ".join(f"(0x{lo:X}, 0x{hi:X})," for lo, hi in ranges[i : i + 6])
            print("    " + row)
        print("];")
    spaces = sorted(cp for cp, k in classes.items() if k == "S")
    print("// whitespace:", " ".join(f"{cp:X}" for cp in spaces))


def compare_slow(tf4_dir):
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        del sys.modules[name]
    sys.path.insert(0, tf4_dir)
    # transformers 4.x refuses to import next to tokenizers/huggingface-hub
    # versions newer than it knows; the slow tokenizer needs neither.
    import types

    check = types.ModuleType("transformers.dependency_versions_check")
    check.dep_version_check = lambda *a, **k: None
    sys.modules["transformers.dependency_versions_check"] = check
    import transformers as tf4
    from transformers.models.bert.tokenization_bert import BasicTokenizer

    cases = json.load(open(OUT, encoding="utf-8"))["cases"]
    with tempfile.TemporaryDirectory() as tmp:
        for use_ftfy in (True, False):
            for key, folder in (("sd1", SD1_DIR), ("sd2", sd2_dir(tmp))):
                slow = tf4.CLIPTokenizer.from_pretrained(folder)
                if not use_ftfy:
                    # What CLIPTokenizer.__init__ does when ftfy is missing.
                    slow.fix_text = None
                    slow.nlp = BasicTokenizer(strip_accents=False, do_split_on_punc=False)
                diffs = [c["prompt"] for c in cases if slow(c["prompt"])["input_ids"] != c[key + "_ids"]]
                label = "with ftfy" if use_ftfy else "without ftfy"
                print(f"transformers {tf4.__version__} slow CLIPTokenizer {label}, {key}: "
                      f"{len(cases) - len(diffs)}/{len(cases)} equal; differ: {diffs!r}")


def main():
    if "--slow-transformers" in sys.argv:
        compare_slow(sys.argv[sys.argv.index("--slow-transformers") + 1])
        return
    if "--rust-tables" in sys.argv:
        rust_tables()
        return
    tok1 = CLIPTokenizer.from_pretrained(SD1_DIR)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        folder2 = sd2_dir(tmp)
        tok2 = CLIPTokenizer.from_pretrained(folder2)
        assert tok1.pad_token_id == 49407 and tok2.pad_token_id == 0
        for text in PROMPTS:
            ids1, padded1 = encode(tok1, text)
            ids2, padded2 = encode(tok2, text)
            cases.append(
                {
                    "prompt": text,
                    "sd1_ids": ids1,
                    "sd1_padded": padded1,
                    "sd2_ids": ids2,
                    "sd2_padded": padded2,
                }
            )
        print(f"transformers {transformers.__version__}: {type(tok1).__name__}")
        cross_check("sd1", SD1_DIR, tok1)
        cross_check("sd2", folder2, tok2)
    doc = {
        "source": f"transformers {transformers.__version__} CLIPTokenizer, tools/make_tokenizer_fixtures.py",
        "cases": cases,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    long_ = sum(len(c["sd1_ids"]) > 77 for c in cases)
    print(f"wrote {OUT}: {len(cases)} cases, {long_} longer than 77 ids")


if __name__ == "__main__":
    main()
