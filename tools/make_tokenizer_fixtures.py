#!/usr/bin/env python3
"""Reference token ids for tests/tokenizer.rs, from transformers' CLIPTokenizer.

Writes tests/fixtures/tokenizer_cases.json: for each prompt, the unpadded ids
(`tok(text)["input_ids"]`, BOS + tokens + EOS, no truncation) and the ids
diffusers feeds the text encoder (`padding="max_length", truncation=True,
max_length=77`), for both pad styles (`sd2_ids` only where it differs from
`sd1_ids`, to keep the file small):

  sd1: weights/tiny-shapes/tokenizer/        (pad "<|endoftext|>" = 49407)
  sd2: same vocab + tests/fixtures/tokenizer_sd2/*.json  (pad "!" = 0)

Prompts: the 43 hand-written PROMPTS, then deterministic generated classes
(seeded `random`, fixed word lists): SD prompts with weighting syntax,
negative prompts, 12+ languages/scripts, emoji (ZWJ, skin tones, flags,
keycaps, tag sequences), numbers and dates, URLs and code, punctuation runs,
every Unicode whitespace kind, special-token look-alikes, random character
mixes, prompts of exactly 76-79 ids, 150-300-token prompts, and text that
NFC changes (decomposed accents, Vietnamese stacked marks, Hangul jamo,
marks out of canonical order, singletons, exclusions: NFC_PROMPTS).

The same file's "nfc" object tests src/tokenizer/nfc.rs on its own: "cases",
a few hundred strings (NFC_STRINGS, then seeded samples of composition
pairs, random mark soups, jamo runs and singletons) with the reference NFC,
which is `tokenizers`' normalizers.NFC() (Unicode 9.0.0), plus "python_nfc"
where Python's unicodedata (a newer Unicode) answers differently; and
"sweeps", FNV-1a hashes of the reference NFC over every code point, every
pair of combining marks and all Hangul sequences (defined in
tools/make_nfc_table.py, mirrored in tests/tokenizer.rs).

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
import random
import shutil
import sys
import tempfile
import unicodedata

import tokenizers
import transformers
from tokenizers import normalizers
from transformers import CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_nfc_table  # noqa: E402 - the sweep definitions shared with the table generator

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

# ---------------------------------------------------------------------------------------------
# Generated prompt classes (deterministic: a fixed seed and fixed word lists)
# ---------------------------------------------------------------------------------------------

SUBJECTS = [
    "a portrait of an old fisherman", "a red fox in the snow", "a cozy cabin in the woods",
    "an astronaut floating in space", "a medieval castle on a cliff", "a bowl of ramen",
    "a cyberpunk samurai", "a lighthouse during a storm", "a cat wearing sunglasses",
    "a futuristic sports car", "an enchanted forest", "a steampunk airship",
    "a girl with a pearl earring", "a dragon made of glass", "a bustling market in Marrakesh",
]
STYLES = [
    "oil painting", "watercolor", "digital art", "concept art", "35mm film photo", "isometric",
    "low poly", "ukiyo-e", "art nouveau", "pixel art", "studio ghibli style", "hdr", "bokeh",
    "golden hour", "volumetric lighting", "cinematic", "8k uhd", "dslr", "unreal engine",
]
ARTISTS = [
    "greg rutkowski", "alphonse mucha", "artgerm", "wlop", "makoto shinkai", "hayao miyazaki",
    "james gurney", "thomas kinkade", "zdzisław beksiński", "hr giger", "moebius", "beeple",
    "craig mullins", "ilya kuvshinov", "rossdraws", "simon stålenhag", "frida kahlo",
]
NEGATIVES = [
    "lowres", "bad anatomy", "bad hands", "text", "error", "missing fingers", "extra digit",
    "fewer digits", "cropped", "worst quality", "low quality", "normal quality", "jpeg artifacts",
    "signature", "watermark", "username", "blurry", "deformed", "disfigured", "mutated",
    "extra limbs", "ugly", "duplicate", "morbid", "out of frame", "poorly drawn face",
]


def weighted(rng, term):
    """One of the prompt-weighting syntaxes of the popular UIs (the tokenizer sees plain text)."""
    k = rng.randrange(8)
    w = rng.choice(["0.5", "0.8", "1.1", "1.2", "1.25", "1.4", "1.5", "2"])
    return [
        f"({term}:{w})", f"(({term}))", f"[{term}]", f"{{{term}}}", f"({term})++",
        f"[{term}:{term.split()[0]}:0.3]", f"{term}::{w}", term,
    ][k]


def sd_prompts(rng, n):
    out = []
    for _ in range(n):
        parts = [rng.choice(SUBJECTS)]
        parts += [weighted(rng, s) for s in rng.sample(STYLES, rng.randrange(1, 5))]
        parts += ["by " + " and ".join(rng.sample(ARTISTS, rng.randrange(1, 3)))]
        if rng.random() < 0.3:
            parts.append("trending on artstation")
        if rng.random() < 0.3:
            parts.insert(rng.randrange(len(parts)), f"<lora:{rng.choice(['detail', 'ghibli_v2', 'add-more'])}:{rng.choice(['0.6', '1'])}>")
        sep = rng.choice([", ", ",", " , ", " | ", ". ", " AND "])
        out.append(sep.join(parts))
    return out


def negative_prompts(rng, n):
    out = []
    for _ in range(n):
        terms = rng.sample(NEGATIVES, rng.randrange(3, 12))
        out.append(", ".join(weighted(rng, t) if rng.random() < 0.3 else t for t in terms))
    return out


MULTILINGUAL = [
    # French, German, Spanish, Portuguese, Italian, Polish, Czech, Turkish, Vietnamese (all NFC)
    "une peinture à l'huile d'un château médiéval, éclairage doré, très détaillé",
    "Ça s'est passé près de l'église; où êtes-vous? Noël à Paris, crème brûlée",
    "ein Ölgemälde eines Fuchses im Schnee, Größe, Straße, Mädchen, ÄÖÜ äöü ẞ",
    "Grüße aus München! Übergrößenträger, Fußgängerübergänge",
    "una pintura al óleo de un dragón, iluminación cálida, niño, año, ¿qué? ¡olé!",
    "Señor Muñoz comió piñata en La Coruña; acción, canción, corazón",
    "uma pintura a óleo de um pássaro, coração, ação, São Paulo",
    "un ritratto di una donna, perché, così, città, caffè",
    "zażółć gęślą jaźń, Łódź, Kraków",
    "příliš žluťoučký kůň úpěl ďábelské ódy",
    "İstanbul'da ılık bir akşam, ĞÜŞİÖÇ ğüşiöç",
    "Tiếng Việt: phở bò, bánh mì, Hà Nội, Đà Nẵng",
    # Russian, Ukrainian, Greek
    "портрет старого рыбака, масляная живопись, высокая детализация",
    "Съешь же ещё этих мягких французских булок, да выпей чаю. ЁЛКА",
    "Київ, ґанок, їжак, Україна",
    "πορτρέτο ενός γέρου ψαρά, ελαιογραφία, ΑΘΗΝΑ, Σωκράτης, ΟΔΥΣΣΕΥΣ",
    "Ξεσκεπάζω τὴν ψυχοφθόρα βδελυγμία",
    # Arabic, Hebrew, Persian, Hindi, Bengali, Tamil, Thai
    "لوحة زيتية لقلعة في الصحراء، إضاءة ذهبية",
    "مرحبا بالعالم! ١٢٣ ٤٥٦",
    "ציור שמן של טירה על צוק, שלום עולם",
    "نقاشی رنگ روغن از یک قلعه، ۱۴۰۲",
    "एक पुराने मछुआरे का चित्र, तैल चित्र, नमस्ते दुनिया",
    "हिन्दी में संख्या १२३४ और विराम चिह्न।",
    "একটি দুর্গের তৈলচিত্র",
    "ஒரு கோட்டையின் எண்ணெய் ஓவியம்",
    "ภาพวาดสีน้ำมันของปราสาท สวัสดีชาวโลก",
    # Chinese, Japanese, Korean
    "一幅城堡的油画，金色的光线，高度详细，杰作",
    "繁體中文：龍、鳳、麒麟；標點符號「引號」《書名》",
    "赛博朋克城市的夜景，霓虹灯，雨天，8K 超高清",
    "日本の城の油絵、夕焼け、とても詳細、傑作",
    "カタカナ ひらがな 漢字 ｶﾀｶﾅ 「こんにちは」、世界！",
    "富士山と桜、浮世絵風、葛飾北斎",
    "성의 유화, 황금빛 조명, 매우 상세함",
    "안녕하세요 세계! 한국어 프롬프트 테스트입니다.",
    # mixed scripts in one prompt
    "a castle 城堡 замок κάστρο قلعة किला 성 château Schloß",
    "anime girl, 初音ミク, 二次元, 4k, (masterpiece:1.2)",
]

EMOJI = [
    "👨‍👩‍👧‍👦 family, 👩‍❤️‍💋‍👨 kiss, 🧑‍🤝‍🧑 people holding hands",
    "👍 👍🏻 👍🏼 👍🏽 👍🏾 👍🏿 thumbs up in every skin tone",
    "🏳️‍🌈 🏴‍☠️ 🇯🇵 🇺🇸 🇩🇪 🇧🇷 flags",
    "keycaps 1️⃣ 2️⃣ #️⃣ *️⃣ 🔟",
    "👩🏽‍🚀 astronaut, 🧑🏿‍🎨 artist, 👨🏼‍🍳 chef, 🧙‍♂️ wizard",
    "🔥🔥🔥 lit, 💯💯, 😂😂😂😂",
    "a 🐱 on a 🛸 above the 🌕, ✨🌌✨",
    "☀️☁️☂️☃️ weather ⛈️ ❄️",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿 scotland tag sequence",
    "emoji only: 🎨",
    "😀😃😄😁😆😅🤣😂🙂🙃😉😊😇🥰😍🤩😘",
    "❤️‍🔥 heart on fire, ❤️‍🩹 mending heart, 🫶🏽",
    "text😀glued😀to😀emoji",
]

NUMBERS = [
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 10000 123456789",
    "3.14159265358979 2.71828 -0.5 +1e-10 6.022e23 1/3 50/50",
    "2024-03-15 15/03/2024 03.15.24 12:34:56 T12:00:00Z 1999",
    "$1,234.56 €99,99 £5 ¥1000 ₹500 ₩10000 20% 0.1% 1st 2nd 3rd 4th",
    "1920x1080 4096×2160 16:9 f/2.8 1/250s ISO100 85mm 24-70mm",
    "version v1.5 sd-v2-1 RTX4090 GPT-4 i7-13700K",
    "phone +1 (555) 123-4567 ext. 89",
    "007 0x7F 0b1010 0o777 1_000_000 NaN Infinity",
]

URLS_CODE = [
    "https://huggingface.co/runwayml/stable-diffusion-v1-5/resolve/main/v1-5-pruned.safetensors",
    "http://www.example.org:8080/a/b/c.html?x=1&y=two%20words#section-3",
    "ftp://user:pass@host.net/file.tar.gz mailto:someone@example.com",
    "C:\\Users\\me\\Pictures\\img_001.png /home/me/.cache/huggingface",
    "def f(x): return x**2 + 2*x - 1  # comment",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "fn main() { println!(\"{:?}\", vec![1, 2, 3]); }",
    "SELECT * FROM images WHERE score >= 0.9 ORDER BY id DESC;",
    "<img src=\"a.png\" alt='cat'/> {\"key\": [1, 2, null], \"ok\": true}",
    "$ pip install diffusers==0.27.0 && python -m venv .venv",
    "x => x * 2; a != b; c == d; e <= f; g >= h; i && j || !k",
    "@decorator #include <stdio.h> %d %s \\n \\t ${VAR}",
]

PUNCTUATION = [
    "!!!!!!!!!!!!!!!!!!!!",
    "??????",
    "........................................",
    ",,,,,,,,,,,,",
    "a,b,c,d,e,f,g",
    "wait... what?! no!!! yes??? ok.",
    "((((((((((deep))))))))))",
    "[[[[nested]]]] {{{{braces}}}} <<<<angles>>>>",
    "----- ===== _____ ***** ~~~~~ ^^^^^",
    "“smart quotes” ‘single’ «guillemets» „German“ — em dash – en dash … ellipsis",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "a!b@c#d$e%f^g&h*i(j)k",
    "'''quoted''' \"\"\"triple\"\"\" ''''",
    "it's it’s don’t don't I'M YOU'RE we'VE",
    "rock'n'roll o'clock ma'am y'all 'twas",
    "! ! ! ! ! ! ! ! !",
    "hello!world!again",
    "end with bang!",
    "!start with bang",
    "§¶†‡•°±×÷¬¦©®™",
    "←→↑↓↔ ⇒⇔ ∀∃∅∈∉∑∏√∞≈≠≤≥ ∫∂∇",
    "♠♣♥♦ ♩♪♫♬ ☺☻ ★☆ ✓✔✗✘",
]

WHITESPACE = [
    "\t",
    "\n\n\n",
    "\r\n",
    "a\tb\nc\rd\r\ne",
    "tabs\t\t\tinside\t\twords",
    "  two  spaces  between  words  ",
    "line one\nline two\nline three",
    "paragraph one.\n\nparagraph two.\n\n\nparagraph three.",
    "\u000bvertical tab\u000cform feed\u0085next line",
    "en\u2002em\u2003thin\u2009hair\u200aspace",
    "narrow\u202fno-break\u205fmath\u1680ogham",
    "line\u2028separator\u2029paragraph",
    "ideographic\u3000\u3000space",
    "nbsp\u00a0\u00a0twice",
    "zero\u200bwidth\u200cnon\u200djoiner\u2060word",
    "\t leading tab and space",
    "trailing newline\n",
]

ODD = [
    "a",
    "A",
    "I",
    "x y z",
    "ab",
    "<|endoftext|>",
    "<|startoftext|>",
    "<|endoftext|><|endoftext|>",
    "before <|endoftext|>after",
    "<|endoftext|",
    "|endoftext|>",
    "<|end of text|>",
    "<|ENDOFTEXT|>",
    "a</w> b</w>",
    "</w></w></w>",
    "Ġhello Ċworld",
    "ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖØÙÚÛÜÝÞß",
    "àáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿ",
    "ŉ ǰ ΐ ẖ ﬀ ﬃ ﬆ",
    "ΣΑΣ σας ΌΣΟΣ",
    "DŽ Dž dž Ǉ ǈ ǉ",
    "𝐛𝐨𝐥𝐝 𝑖𝑡𝑎𝑙𝑖𝑐 𝕕𝕠𝕦𝕓𝕝𝕖 𝔣𝔯𝔞𝔨𝔱𝔲𝔯",
    "𐐀𐐁 𐐨𐐩 deseret",
    "\U0001d7ce\U0001d7cf\U0001d7d0 math digits",
    "Ⅰ Ⅱ Ⅲ Ⅳ ⅰ ⅱ roman numerals",
    "\ue000\uf8ff private use \U000f0000",
    "\ufffd replacement \ufffe\uffff nonchars",
    "hello\x1b[31mred\x1b[0m",
    "null\x00byte",
    "AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVvWwXxYyZz",
    "thequickbrownfoxjumpsoverthelazydog" * 3,
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua.",
]


def random_strings(rng, n):
    """Random mixes of characters from every class above (letters of several scripts, digits,
    punctuation, symbols, emoji parts, whitespace), for what the hand-written lists miss."""
    pool = (
        "abcxyzABCXYZ0123456789 .,;:!?'\"()[]{}<>|\\/-_+=*&^%$#@~`"
        "éèüößñçÆØÅΣσςπЖжЯя中文日本語한국어ابجअआ१२٣"
        "\t\n\u00a0\u3000\u200d\ufe0f🎨👍🏽🇫🇷"
    )
    out = []
    for _ in range(n):
        out.append("".join(rng.choice(pool) for _ in range(rng.randrange(1, 60))))
    return out


def boundary_prompts(tok):
    """Prompts whose unpadded ids (BOS + tokens + EOS) number exactly 76, 77, 78 and 79, one made
    of single-token words and one where a multi-token word straddles the 77-id cut."""
    out = []
    words = ["red", "fox", "snow", "forest", "light", "castle", "river", "moon"]
    for target in (76, 77, 78, 79):
        text = " ".join(words[i % len(words)] for i in range(target - 2))
        assert len(tok(text)["input_ids"]) == target, target
        out.append(text)
    # A long word split into several BPE pieces across the cut.
    for target in (77, 78):
        base = " ".join(words[i % len(words)] for i in range(target - 4))
        for extra in ("pneumonoultramicroscopic", "zdzisław", "🎨🎨", "1234"):
            text = base + " " + extra
            if len(tok(text)["input_ids"]) > target:
                out.append(text)
                break
    return out


def long_prompts(rng, tok):
    """Prompts of 150 to 300 tokens (two to four 75-token chunks, for long-prompt weighting)."""
    out = []
    for target in (150, 200, 300):
        parts = []
        while len(tok(", ".join(parts))["input_ids"]) < target:
            parts.append(rng.choice(sd_prompts(rng, 1) + negative_prompts(rng, 1)))
        out.append(", ".join(parts))
    return out


def generated_prompts(tok):
    rng = random.Random(20240601)
    return (
        sd_prompts(rng, 40)
        + negative_prompts(rng, 10)
        + MULTILINGUAL
        + EMOJI
        + NUMBERS
        + URLS_CODE
        + PUNCTUATION
        + WHITESPACE
        + ODD
        + random_strings(rng, 20)
        + boundary_prompts(tok)
        + long_prompts(rng, tok)
    )


def all_prompts(tok):
    """The hand-written PROMPTS, then the generated classes, then NFC_PROMPTS (each of which NFC
    changes, asserted, so none is a no-op by accident)."""
    prompts = list(PROMPTS)
    for text in generated_prompts(tok):
        if text not in prompts:
            prompts.append(text)
    ref_nfc = normalizers.NFC()
    unchanged = [t for t in NFC_PROMPTS if ref_nfc.normalize_str(t) == t]
    assert not unchanged, f"NFC_PROMPTS that NFC leaves alone: {unchanged!r}"
    for text in NFC_PROMPTS:
        if text not in prompts:
            prompts.append(text)
    return prompts


# ---------------------------------------------------------------------------------------------
# NFC: prompts that NFC changes, and the unit cases of src/tokenizer/nfc.rs
# ---------------------------------------------------------------------------------------------

NFC_PROMPTS = [
    "cafe\u0301",
    "a photo of a cafe\u0301 in Paris, re\u0301sume\u0301, nai\u0308ve, jalapen\u0303o",
    "A\u030Angstro\u0308m and \u212Bngstr\u00f6m and \u00C5ngstr\u00f6m",
    "A\u030A",
    "\u2126 ohm, 10\u212A kelvin, \u212B",
    # Vietnamese: stacked marks decomposed, in canonical and in non-canonical order
    "Tie\u0302\u0301ng Vie\u0323\u0302t: pho\u031B\u0309 bo\u0300, ba\u0301nh mi\u0300, Ha\u0300 No\u0323\u0302i",
    "Vie\u0302\u0323t Nam, \u0110a\u0300 Na\u0306\u0303ng, Nguye\u0302\u0303n",
    "o\u0301\u031B o\u031B\u0301 u\u031B\u0300 a\u0306\u0323 a\u0323\u0306 e\u0301\u0302 e\u0302\u0301",
    # Hangul: conjoining jamo (L V T), syllable + T, archaic jamo, the T_BASE edge
    "\u1112\u1161\u11AB\u1100\u116E\u11A8\u110B\u1165 \u1109\u1165\u110B\u116E\u11AF",
    "\uAC00\u11A8 \uAC01\u11A8 \u1100\u1161\u11A7 \u1113\u1161 \u1100\u1176 \u1100\u1161\u11C3",
    "\u110B\u1161\u11AB\u1102\u1167\u11BC\u1112\u1161\u1109\u1166\u110B\u116D \uc138\uacc4!",
    # Compatibility characters are NFKC's business: NFC keeps them (only the accent changes here)
    "\ufb01ne \ufb02ower \ufb03 \u00b2 \u2460 \uff21\uff42 \u3392 \u01c5 cafe\u0301",
    # Singleton decompositions and composition exclusions
    "what\u037E why\u0387 \u2000en quad\u2001em quad \u1FEFgrave \u2329angle\u232A",
    "\uF900\uF901\uF902 \U0002F800\U0002F801 \uFA10 compatibility ideographs",
    "\u0915\u093C \u0958 \u09A1\u09BC \u09DC \u0A32\u0A3C \u0A33 \uFB1D \u05D9\u05B4",
    "\u0344 \u0F73 \u0F75 \u0F81 \u0340\u0341\u0343 \u0374 non-starter decompositions",
    "\u2ADC \u2ADD\u0338 \U0001D15E \U0001D157\U0001D165",
    # Greek with breathing, accent and iota subscript in every order
    "\u03B1\u0313\u0301\u0345 \u03C9\u0345\u0313 \u03B7\u0345\u0342\u0314 \u039F\u0301\u03A3\u039F\u03A3 \u1F71",
    # Kana voicing marks, Indic two-part vowels
    "\u304B\u3099\u30CF\u309A\u30D8\u3099 \u30A6\u3099 \u3046\u3099",
    "\u0B47\u0B3E \u0B47\u0B56 \u0BC6\u0BBE \u0D46\u0D3E \u0DD9\u0DCF \u1B05\u1B35",
    # Marks: leading, stacked, blocked, and next to special tokens
    "\u0301leading mark, a\u0301\u0301 double, a\u0328\u0301 ogonek, a\u0316\u0301 below, a\u0301\u0316",
    "a<|endoftext|>\u0301b <|endoftext|>\u0338 x<|startoftext|>\u0301",
    "=\u0338 <\u0338 >\u0338 \u2203\u0338 \u2208\u0338",
    # Code points after Unicode 9: the reference leaves them where Python 3.11 reorders/composes
    "e\u1AC1\u0323 a\u0898\u0316 o\u1ACB\u031B\u0301 a\u0345\u1ABF e\u0301 \U00011935\U00011930",
    "\u0130\u0307 I\u0307 I\u0307\u0301 \u1E9E SS\u0308 e\u0301",
    "C\u0327\u0301 c\u0301\u0327 \u00C7\u0301 Z\u030C\u0327 s\u0323\u0307 s\u0307\u0323",
    "A\u030A\u0301 \u00C5\u0301 \u01FA a\u030A\u0301",
    # Long decomposed text: NFC happens before the 77-token cut
    ", ".join(["cafe\u0301 cre\u0300me bru\u0302le\u0301e"] * 12),
]

# Hand-written NFC unit cases (every class the NFC code has a branch for), before the samples.
NFC_STRINGS = [
    "", "a", "abc", "caf\u00e9", "cafe\u0301", "CAFE\u0301", "e\u0301", "\u00e9\u0301",
    "A\u030A", "\u212B", "\u00C5", "a\u030A", "A\u030A\u0301", "\u01FA",
    # singletons, exclusions, non-starter decompositions
    "\u2126", "\u212A", "\u037E", "\u0387", "\u1FEF", "\u2000\u2001", "\u2329\u232A", "\u0340\u0341\u0343\u0374",
    "\u1F71", "\u1FFD", "\u0344", "\u0F73", "\u0F75", "\u0F81", "\u0958", "\u0915\u093C", "\u09DC", "\u0A33",
    "\u0A36", "\u0F43", "\u0F42\u0FB7", "\uFB1D", "\u05D9\u05B4", "\uFB2A", "\u05E9\u05C1", "\u2ADC",
    "\u2ADD\u0338", "\U0001D15E", "\U0001D157\U0001D165", "\U0001D1BB", "\uF900", "\uFA10", "\uFA0E",
    "\U0002F800", "\U0002FA1D",
    # compatibility characters: NFC keeps them
    "\ufb01", "\ufb00\ufb01\ufb02\ufb03\ufb04\ufb05\ufb06", "\u00b2\u00b3\u00b9", "\u2460", "\uff21", "\u3392",
    "\u01c4\u01c5\u01c6", "\u017f", "\u1e9b", "\u1e9b\u0323", "\u017f\u0323\u0307", "\u2075", "\u00bd",
    "\u2126\u0301",
    # Vietnamese stacked marks
    "e\u0302\u0301", "e\u0301\u0302", "e\u0323\u0302", "e\u0302\u0323", "o\u031B\u0301", "o\u0301\u031B",
    "o\u031B\u0323", "o\u0323\u031B", "u\u031B\u0303", "a\u0306\u0309", "a\u0323\u0306", "a\u0306\u0323",
    "Vie\u0323\u0302t", "Vie\u0302\u0323t", "\u1EC7", "\u1EC7\u0301", "\u1EDB\u0323",
    # Hangul
    "\u1100\u1161", "\u1100\u1161\u11A8", "\u1100\u1161\u11A7", "\u1100\u1161\u11C2", "\u1100\u1161\u11C3",
    "\uAC00\u11A8", "\uAC01\u11A8", "\uAC00\u11A7", "\uD7A3", "\uD7A3\u11A8", "\u1112\u1175\u11C2",
    "\u1113\u1161", "\u1100\u1176", "\u1100\u1100\u1161", "\u1100\u1161\u1161", "\u1161\u11A8", "\u11A8",
    "\u1100\u0301\u1161", "\u1100\u1161\u0301\u11A8", "\u115F\u1160", "\u1112\u1161\u11AB\u1100\u116E\u11A8",
    # combining marks out of canonical order, blocking, leading non-starters
    "a\u0301\u0316", "a\u0316\u0301", "a\u0301\u0301", "a\u0328\u0301", "a\u0301\u0328", "a\u0334\u0301",
    "a\u0345\u0301", "a\u0315\u0300\u05AE\u0300b", "a\u0300\u0315\u0300", "\u0301", "\u0301a",
    "\u0301\u0316\u0300", "\u0345\u0334\u0327\u0301\u0316\u0315", "\u03B1\u0313\u0301\u0345",
    "\u03C9\u0345\u0313", "\u03B7\u0345\u0342\u0314", "\u03B9\u0308\u0301", "\u03C5\u0301\u0308",
    "\u0399\u0308", "\u0301\u0308\u0300", "a\u05B0\u05B1\u0301", "a\u0651\u064E", "a\u064E\u0651",
    "\u0627\u0653", "\u0627\u0654", "\u0648\u0654", "\u064A\u0654",
    # two-part vowels (the second part is a starter), nukta, kana voicing
    "\u0B47\u0B3E", "\u0B47\u0B56", "\u0B47\u0B57", "\u0BC6\u0BBE", "\u0BC7\u0BBE", "\u0BC6\u0BD7",
    "\u0BD7\u0BC6", "\u0CBF\u0CD5", "\u0CC6\u0CC2\u0CD5", "\u0D46\u0D3E", "\u0DD9\u0DCA", "\u0DD9\u0DCF\u0DCA",
    "\u1025\u102E", "\u1B05\u1B35", "\U00011099\U000110BA", "\U00011131\U00011127", "\U00011347\U0001133E",
    "\U000114B9\U000114BA", "\U000115B8\U000115AF", "\u304B\u3099", "\u30CF\u309A", "\u3099",
    "\u304B\u0301\u3099", "\u3046\u3099", "\u309D\u3099",
    # after Unicode 9: the reference does not know these (Python 3.11's NFC differs)
    "a\u0345\u1ABF", "\U00011935\U00011930", "a\u0898\u0316", "a\u0345\u08D3", "e\u1AC1\u0323",
    "o\u1ACB\u031B\u0301", "x\u0345\u07FD", "x\u1AC0\u0301", "\U00011938", "a\u0898\u0301",
    "a\u0301\u0898", "\u08D3\u0345", "a\u0C3C\u0315", "a\u0301\u0C3C",
    # mixtures, special-token text, interplay with lower-casing and whitespace
    "<|endoftext|>\u0338", ">\u0338", "=\u0338", "\u0130", "\u0130\u0307", "I\u0307", "\u1E9E", "\u00DF\u0301",
    "\u00C7\u0301", "C\u0327\u0301", "c\u0301\u0327", "Z\u030C\u0327", "s\u0323\u0307", "s\u0307\u0323",
    "\u1E69", "A\u0308\u0304", "\u01DE", "\u01D5\u0301", "U\u0308\u0301",
    "\u00a0\u0301", " \u0301", "\t\u0301", "\n\u0301", "\u0000\u0301", "\ufeff\u0301", "\u200d\u0301",
    "\U0001F44D\U0001F3FD\u0301", "\u6771\u4EAC\u0301", "\ud55c\uad6d\uc5b4",
]


def nfc_cases():
    """NFC_STRINGS, then seeded samples: composition pairs (one level and fully decomposed,
    exclusions included), singletons, random mark soups, jamo runs."""
    ref_nfc = normalizers.NFC()
    rng = random.Random(20240615)
    _, singles, pairs = make_nfc_table.python_data()
    strings = list(NFC_STRINGS)
    for cp, (a, b) in rng.sample(sorted(pairs.items()), 90):
        strings.append(chr(a) + chr(b))
        strings.append(unicodedata.normalize("NFD", chr(cp)))
    strings += [chr(cp) for cp in rng.sample(sorted(singles), 20)]
    strings += make_nfc_table.random_soups(n=60, seed=20240616)
    jamo = [chr(c) for c in (*range(0x10FF, 0x1114), *range(0x1160, 0x1177), *range(0x11A6, 0x11C4))]
    jamo += ["\uAC00", "\uAC01", "\uD7A3"]
    strings += ["".join(rng.choice(jamo) for _ in range(rng.randrange(2, 7))) for _ in range(40)]
    cases, seen = [], set()
    for text in strings:
        if text in seen:
            continue
        seen.add(text)
        case = {"text": text, "nfc": ref_nfc.normalize_str(text)}
        python = unicodedata.normalize("NFC", text)
        if python != case["nfc"]:
            case["python_nfc"] = python
        cases.append(case)
    return cases


def nfc_sweeps():
    """FNV-1a 64 of the reference NFC of each chunk of each sweep (see make_nfc_table.py)."""
    ref_nfc = normalizers.NFC()
    marks = make_nfc_table.mark_ranges()
    sweeps = []
    for name in make_nfc_table.SWEEPS:
        inputs = make_nfc_table.sweep_inputs(name, marks)
        hashes = [
            f"{make_nfc_table.fnv1a64(ref_nfc.normalize_str(chunk).encode()):016x}"
            for chunk in make_nfc_table.sweep_chunks(inputs)
        ]
        sweeps.append({"name": name, "inputs": len(inputs), "fnv1a64": hashes})
    return {"chunk": make_nfc_table.SWEEP_CHUNK, "mark_ranges": marks, "sweeps": sweeps}


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


def cross_check(name, folder, ref, prompts):
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
        diffs = [t for t in prompts if encode(other, t) != encode(ref, t)]
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
                diffs = [c["prompt"] for c in cases if slow(c["prompt"])["input_ids"] != c.get(key + "_ids", c["sd1_ids"])]
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
        prompts = all_prompts(tok1)
        for text in prompts:
            ids1, padded1 = encode(tok1, text)
            ids2, padded2 = encode(tok2, text)
            case = {"prompt": text, "sd1_ids": ids1, "sd1_padded": padded1, "sd2_padded": padded2}
            if ids2 != ids1:  # only where SD 2.x's special "!" splits the text differently
                case["sd2_ids"] = ids2
            cases.append(case)
        print(f"transformers {transformers.__version__}: {type(tok1).__name__}")
        cross_check("sd1", SD1_DIR, tok1, prompts)
        cross_check("sd2", folder2, tok2, prompts)
    nfc = {
        "source": f"tokenizers {tokenizers.__version__} normalizers.NFC (Unicode {make_nfc_table.REFERENCE_UNICODE}); "
        f"python_nfc: Python unicodedata {unicodedata.unidata_version}, only where it differs",
        "unicode_version": make_nfc_table.REFERENCE_UNICODE,
        "cases": nfc_cases(),
        **nfc_sweeps(),
    }
    doc = {
        "source": f"transformers {transformers.__version__} CLIPTokenizer, tools/make_tokenizer_fixtures.py",
        "note": "sd2_ids is left out where it equals sd1_ids (same vocabulary; only the pad token differs)",
        "cases": cases,
        "nfc": nfc,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    long_ = sum(len(c["sd1_ids"]) > 77 for c in cases)
    changed = sum(normalizers.NFC().normalize_str(c["prompt"]) != c["prompt"] for c in cases)
    print(f"wrote {OUT}: {len(cases)} cases, {long_} longer than 77 ids, {changed} changed by NFC; "
          f"{len(nfc['cases'])} NFC cases, {len(nfc['sweeps'])} NFC sweeps")


if __name__ == "__main__":
    main()
