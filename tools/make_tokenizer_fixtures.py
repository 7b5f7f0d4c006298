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
mixes, prompts of exactly 76-79 ids, and 150-300-token prompts. All are NFC
(asserted), since src/tokenizer.rs does not apply NFC.

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
    """The hand-written PROMPTS, then the generated classes; every one must be NFC already
    (src/tokenizer.rs does not normalise to NFC, see its module docs)."""
    prompts = list(PROMPTS)
    for text in generated_prompts(tok):
        if text not in prompts:
            prompts.append(text)
    not_nfc = [t for t in prompts if unicodedata.normalize("NFC", t) != t]
    assert not not_nfc, f"prompts not in NFC: {not_nfc!r}"
    return prompts


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
    doc = {
        "source": f"transformers {transformers.__version__} CLIPTokenizer, tools/make_tokenizer_fixtures.py",
        "note": "sd2_ids is left out where it equals sd1_ids (same vocabulary; only the pad token differs)",
        "cases": cases,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    long_ = sum(len(c["sd1_ids"]) > 77 for c in cases)
    print(f"wrote {OUT}: {len(cases)} cases, {long_} longer than 77 ids")


if __name__ == "__main__":
    main()
