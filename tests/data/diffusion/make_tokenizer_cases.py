"""Reference ids for kiln's CLIP tokenizer (src/diffusion/tokenizer/).

Versions: transformers 4.57.6 (the slow `CLIPTokenizer`), ftfy 6.3.1, regex 2026.11.19, CPython 3.11.7.
Run from the repository root (deterministic; no network):

    python models/tools/clip_vocab.py models/sd-tiny-random/tokenizer   # if the folder is missing
    /work/fixture-venv/bin/python tests/data/diffusion/make_tokenizer_cases.py

Writes:

- tests/data/diffusion/tokenizer_cases.json: for each prompt, what Stable Diffusion pipelines feed the
  text encoder, `tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids`,
  with ftfy installed (CLIPTokenizer then runs `whitespace_clean(ftfy.fix_text(text)).lower()`), from
  models/sd-tiny-random/tokenizer; whether it was truncated, how many tokens were used and dropped,
  and `tokenizer.decode(ids, skip_special_tokens=True)` (the text a reply shows as used); for
  non-ASCII prompts also the ids without ftfy (CLIPTokenizer falls back to BERT's BasicTokenizer when
  `import ftfy` fails: computed in a subprocess where ftfy cannot be imported). `sd2_pad` repeats a few
  prompts with the SD 2.x special tokens (pad `!`, id 0, which then splits the text like
  `<|endoftext|>` does). `known_differences` are prompts where kiln deliberately differs: their fields
  are what kiln gives, computed here by emulating the difference (see `known_differences()`), and
  `python_ids`/`python_decoded` what CLIPTokenizer gives.
- src/diffusion/tokenizer/html_entities.txt: ftfy's table of HTML entities (`name:HEX[,HEX]`).
"""

import json
import random
import shutil
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER_DIR = ROOT / "models/sd-tiny-random/tokenizer"
OUT = ROOT / "tests/data/diffusion/tokenizer_cases.json"
ENTITIES = ROOT / "src/diffusion/tokenizer/html_entities.txt"
MAX = 77

# The SD 2.x tokenizer files (stabilityai/stable-diffusion-2-1), legacy format: special_tokens_map.json
# overrides tokenizer_config.json, so the pad token is "!".
SPECIAL = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
SD2_SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": "<|startoftext|>", **SPECIAL},
    "eos_token": {"content": "<|endoftext|>", **SPECIAL},
    "pad_token": "!",
    "unk_token": {"content": "<|endoftext|>", **SPECIAL},
}
SD2_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", **SPECIAL},
    "do_lower_case": True,
    "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", **SPECIAL},
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", **SPECIAL},
}
SD2_PROMPTS = ["a cat", "hello!", "wow!! amazing!!!", "!", "<|endoftext|>!", "don't!", "Ｈｉ！", "&excl; ! &#33;"]

WORDS = "a photo of cat dog portrait landscape city night neon painting detailed 8k bokeh sunset".split()
WORDS += "café naïve Straße İzmir Ελλάδα Москва 東京 서울 مرحبا 🐱 👍🏽 ﬁne ＡＢＣ “quoted” don't it's".split()
SEPS = [" ", ", ", "  ", "\n", "\t", " - ", "! ", "... ", " (", ") ", ": ", "’s "]


def hand_written():
    """(name, text) pairs, by topic."""
    c = {
        "english": ["a photo of a cat", "an astronaut riding a horse on mars",
                    "A beautiful landscape painting of mountains at sunset, trending on artstation",
                    "portrait of an old man, highly detailed, 8k, octane render, volumetric lighting",
                    "a cyberpunk city at night with neon lights and rain", "masterpiece, best quality, 1girl, solo",
                    "(masterpiece:1.2), (best quality), ultra-detailed, ((long hair)), [[blue eyes]]",
                    "photo of a dog, 35mm, f/1.8, bokeh --ar 16:9 --v 5", "the quick brown fox jumps over the lazy dog"],
        "punctuation": ["hello, world!", "what?!", "wait... what", "{red|blue} car", "a/b\\c", "100% cotton",
                        "#hashtag @user", "email@example.com", "https://example.com/path?x=1&y=2", "a -- b",
                        "C++ code", "$5.99", "~~~", "___", "!!!", "...", '"quoted"', "'single quoted'", "<>", "<< >>"],
        "numbers": ["1024x768", "3.5", "2023", "12345678901234567890", "v1.5", "4k uhd", "1st 2nd 3rd", "-7",
                    "1,000,000", "0.001", "٣ arabic-indic digit", "½ cup", "x² y³", "Ⅻ roman numeral", "①②③"],
        "contractions": ["don't", "it's", "we're", "they've", "I'm", "you'll", "he'd", "DON'T STOP",
                         "rock'n'roll", "dogs' toys", "'s start", "can't won't shouldn't", "o'clock", "!'s", "it'ſ"],
        "uppercase": ["HELLO WORLD", "CamelCaseWord", "NASA JPL", "ΑΘΗΝΑ", "МОСКВА", "ΟΔΟΣ ΣΑΣ"],
        "whitespace": ["  leading and trailing  ", "multiple    spaces", "line1\nline2", "tab\tseparated",
                       "\r\nwindows\r\nlines\r\n", "old mac\rline", "mixed \t\n\r\v\f whitespace",
                       "no\u00a0break\u00a0space", "\u2003em space", "ideographic\u3000space", "zero\u200bwidth",
                       "\u2028line sep\u2029para sep", "next\x85line", "\x1c\x1d\x1e\x1f separators"],
        "accents": ["café", "naïve", "crème brûlée", "Zoë", "cafe\u0301 combining", "São Paulo", "Ångström",
                    "Øresund", "piñata", "façade", "Dvořák", "Łódź"],
        "german": ["Straße", "STRASSE", "Grüße aus München", "ẞ capital sharp s"],
        "turkish": ["İstanbul", "ISTANBUL", "ılık", "İİİ", "iİ"],
        "greek": ["Ελληνικά", "σοφία", "λόγος", "ὈΔΥΣΣΕΎΣ", "ᾳ ypogegrammeni"],
        "cyrillic": ["Привет, мир", "Ёлка", "Україна"],
        "cjk": ["東京の夜景", "一只猫", "日本語のテキスト", "中文，标点。", "한국어 텍스트", "서울의 밤",
                "ｶﾀｶﾅ halfwidth", "ｶﾞｷﾞ voiced"],
        "scripts": ["مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีครับ", "Tiếng Việt", "ქართული"],
        "emoji": ["🐱", "a cat 🐱 on a 🛋️", "👨‍👩‍👧‍👦 family", "👍🏽 thumbs up", "🏳️‍🌈 flag", "❤️", "🇯🇵",
                  "🏴\U000e0067\U000e0062\U000e0077\U000e006c\U000e0073\U000e007f wales", "😀😃😄", "✨sparkles✨"],
        "quotes": ["“Hello”", "‘single’", "it’s", "it‘s", "ʼn", "„German“", "«French»", "‹a›", "‛odd‟"],
        "dashes": ["em—dash", "en–dash", "a ― b", "minus − sign", "…ellipsis", "a‐b hyphen"],
        "ligatures": ["ﬁsh", "ﬂower", "ﬀ ﬃ ﬄ ﬅ ﬆ", "Ĳssel", "ǅungla", "æsthetic", "œuvre"],
        "fullwidth": ["ＡＢＣ", "ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ", "１２３", "！？", "￥100 ￡5", "＜｜endoftext｜＞"],
        "html": ["&amp;", "rock &amp; roll", "&lt;b&gt;bold&lt;/b&gt;", "<b>&amp;</b>", "&quot;quoted&quot;",
                 "&#39;", "it&#x27;s", "&eacute;t&eacute;", "P&EACUTE;REZ", "&nbsp;", "&amp;amp;", "&#59;",
                 "&#0;", "&#128;", "&#1;", "&#x1F600;", "&notanentity;", "fish &chips", "&#12ab;",
                 "&#99999999999999999999;", "a\n<\n&amp;", "&amp;\n<\n&amp;", "&lt;|endoftext|&gt;", "&NewLine;"],
        "special": ["<|endoftext|>", "a <|endoftext|> b", "<|startoftext|>hello", "<|ENDOFTEXT|>",
                    "<|endoftext|><|endoftext|>", "<|endoftext", "<<|endoftext|>", "<|ſtartoftext|>",
                    "&amp;<|endoftext|>&amp;", "<b>x</b> <|endoftext|> &amp;"],
        "empty": ["", "   ", "\n\n", "\t", "\u3000"],
        "control": ["\x1b[31mred\x1b[0m", "a\x00b", "bell\x07", "\ufeffBOM", "del\x7f", "\x93c1 quotes\x94",
                    "soft\u00adhyphen", "a\u0345b", "\u206atext", "\ufffcobj", "\x1b[1;2Xnot"],
        "unicode": ["Å angstrom sign", "K kelvin", "ℌ fraktur", "ⓐⓑ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0001d400 math bold"],
    }
    return [(f"{topic}/{i}", text) for topic, texts in c.items() for i, text in enumerate(texts)]


def generated(tok):
    """Seeded mixes of words and separators, and prompts of exact lengths around the 75-token limit."""
    rng = random.Random(20261201)
    out = [(f"mix/{i}", "".join(rng.choice(WORDS) + rng.choice(SEPS) for _ in range(rng.randint(2, 12))))
           for i in range(30)]
    base = "a photo of an astronaut riding a horse on mars, highly detailed"
    for n in (74, 75, 76, 77, 100):
        text = base
        while len(tok.tokenize(text)) < n:
            text += " cat"
        assert len(tok.tokenize(text)) == n, n
        out.append((f"length/{n}", text))
    out.append(("length/long", ", ".join(["masterpiece", "best quality", "東京の夜景", "👍🏽"] * 30)))
    out.append(("length/special-at-cut", " ".join(["cat"] * 74) + " <|endoftext|> dog"))
    return out


def known_differences(tok):
    """Prompts where kiln differs on purpose: (name, text, why, what kiln gives), the last computed by
    emulating the difference."""
    no_encoding_fix = load(TOKENIZER_DIR)
    no_encoding_fix.fix_text = partial(__import__("ftfy").fix_text, fix_encoding=False)
    out = []
    for i, text in enumerate(["cafÃ©", "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "Ã¼ber cool"]):
        out.append((f"mojibake/{i}", text, "ftfy fix_encoding (mojibake repair) is not reproduced",
                    record(no_encoding_fix, "", text)))
    # U+1C89 CYRILLIC CAPITAL LETTER TJE is new in Unicode 16: CPython 3.11 (Unicode 14) leaves it alone.
    out.append(("unicode-version/0", "\u1c89ab", "lowercase per Unicode 17 (Rust), not 14 (CPython 3.11)",
                record(tok, "", "\u1c8aab")))
    return out


def load(folder):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def record(tok, name, text):
    enc = tok(text, padding="max_length", max_length=MAX, truncation=True).input_ids
    n = len(tok.tokenize(text))
    case = {"name": name, "text": text, "ids": enc, "truncated": n > MAX - 2, "tokens_used": min(n, MAX - 2),
            "tokens_dropped": max(0, n - MAX + 2), "decoded": tok.decode(enc, skip_special_tokens=True)}
    assert len(enc) == MAX and enc[-1] in (tok.eos_token_id, tok.pad_token_id)
    return case


def ids_without_ftfy(texts):
    """The same prompts through CLIPTokenizer with ftfy unimportable (a fresh interpreter)."""
    proc = subprocess.run([sys.executable, __file__, "--no-ftfy", str(TOKENIZER_DIR)], input=json.dumps(texts),
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def no_ftfy_main(folder):
    sys.modules["ftfy"] = None  # `import ftfy` now raises ImportError
    tok = load(folder)
    assert tok.fix_text is None
    texts = json.load(sys.stdin)
    json.dump([tok(t, padding="max_length", max_length=MAX, truncation=True).input_ids for t in texts], sys.stdout)


def write_entities():
    from ftfy.chardata import HTML_ENTITIES

    items = [f"{k[1:-1]}:{','.join(f'{ord(c):X}' for c in v)}" for k, v in sorted(HTML_ENTITIES.items())
             if len(k) <= 26]  # ftfy's pattern &#?[0-9A-Za-z]{1,24}; never reaches longer names
    lines, line = [], ""
    for item in items:
        if line and len(line) + 1 + len(item) > 100:
            lines.append(line)
            line = ""
        line = f"{line} {item}" if line else item
    lines.append(line)
    header = "# ftfy 6.3.1 chardata.HTML_ENTITIES (name:code points), by tests/data/diffusion/make_tokenizer_cases.py\n"
    ENTITIES.write_text(header + "\n".join(lines) + "\n", encoding="utf-8")


def main():
    import ftfy
    import regex
    import transformers

    assert transformers.__version__ == "4.57.6" and ftfy.__version__ == "6.3.1", "pinned versions"
    tok = load(TOKENIZER_DIR)
    assert tok.fix_text is ftfy.fix_text and tok.model_max_length == MAX
    # Every ordinary case must not depend on ftfy's mojibake repair, which kiln leaves out.
    no_encoding_fix = load(TOKENIZER_DIR)
    no_encoding_fix.fix_text = partial(ftfy.fix_text, fix_encoding=False)
    cases = [record(tok, name, text) for name, text in hand_written() + generated(tok)]
    for case in cases:
        assert case["ids"] == record(no_encoding_fix, "", case["text"])["ids"], case["name"]
    non_ascii = [c for c in cases if not c["text"].isascii()]
    for case, ids in zip(non_ascii, ids_without_ftfy([c["text"] for c in non_ascii])):
        case["ids_without_ftfy"] = ids
    known = []
    for name, text, why, kiln in known_differences(tok):
        python = record(tok, name, text)
        assert python["ids"] != kiln["ids"], name
        known.append({**kiln, "name": name, "text": text, "why": why, "python_ids": python["ids"],
                      "python_decoded": python["decoded"]})

    with tempfile.TemporaryDirectory() as tmp:
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(TOKENIZER_DIR / f, tmp)
        Path(tmp, "special_tokens_map.json").write_text(json.dumps(SD2_SPECIAL_TOKENS_MAP))
        Path(tmp, "tokenizer_config.json").write_text(json.dumps(SD2_TOKENIZER_CONFIG))
        sd2 = load(tmp)
        assert sd2.pad_token_id == 0
        sd2_cases = [record(sd2, f"sd2/{i}", text) for i, text in enumerate(SD2_PROMPTS)]

    differ = sum(c["ids"] != c["ids_without_ftfy"] for c in non_ascii)
    head = {
        "generator": "tests/data/diffusion/make_tokenizer_cases.py",
        "versions": {"transformers": transformers.__version__, "ftfy": ftfy.__version__,
                     "regex": regex.__version__, "python": sys.version.split()[0]},
        "tokenizer_dir": "models/sd-tiny-random/tokenizer",
        "max_length": MAX,
        "non_ascii_cases": len(non_ascii),
        "non_ascii_cases_differing_without_ftfy": differ,
        "sd2_pad": {"special_tokens_map": SD2_SPECIAL_TOKENS_MAP, "tokenizer_config": SD2_TOKENIZER_CONFIG},
    }
    body = json.dumps(head, ensure_ascii=False, indent=1)[:-2]
    sections = {"cases": cases, "sd2_pad_cases": sd2_cases, "known_differences": known}
    for key, rows in sections.items():
        lines = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in rows)
        body += f',\n "{key}": [\n{lines}\n ]'
    OUT.write_text(body + "\n}\n", encoding="utf-8")
    write_entities()
    print(f"{len(cases)} cases ({len(non_ascii)} non-ASCII, {differ} differ without ftfy), "
          f"{len(sd2_cases)} SD 2.x pad cases, {len(known)} known differences -> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--no-ftfy"]:
        no_ftfy_main(sys.argv[2])
    else:
        main()
