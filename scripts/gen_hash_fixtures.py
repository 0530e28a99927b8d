#!/usr/bin/env python3
"""Generate crates/engram-domain/tests/fixtures/python_hashes.jsonl.

Runs the reference design's hashing functions (copied verbatim below) over a
deterministic corpus of nasty inputs, so the Rust port in
crates/engram-domain/src/text.rs can be checked bit for bit against CPython.

Usage (from the repository root):  python3 scripts/gen_hash_fixtures.py
The output is deterministic; CI re-runs this script and `git diff --exit-code`s it.
"""

import hashlib
import json
import pathlib
import random
import sys

if sys.version_info[:2] != (3, 11):
    sys.exit(f"must run under CPython 3.11 (the reference runtime), not {sys.version.split()[0]}")

OUT = pathlib.Path(__file__).resolve().parent.parent / "crates/engram-domain/tests/fixtures/python_hashes.jsonl"


# ---- Reference design, verbatim ---------------------------------------------

def normalize_content(content: str) -> str:
    normalized = content.lower()
    normalized = ' '.join(normalized.split())
    normalized = normalized.rstrip('.,!?;:')
    return normalized

def compute_content_hash(content: str) -> str:
    normalized = normalize_content(content)
    return hashlib.sha256(normalized.encode('utf-8')).hexdigest()

def compute_semantic_hash(content: str, num_bits: int = 64) -> str:
    tokens = normalize_content(content).split()
    v = [0] * num_bits
    for token in tokens:
        h = hashlib.sha256(token.encode('utf-8')).digest()
        for i in range(num_bits):
            byte_idx = i // 8
            bit_idx = i % 8
            if byte_idx < len(h):
                if (h[byte_idx] >> bit_idx) & 1:
                    v[i] += 1
                else:
                    v[i] -= 1
    fingerprint = 0
    for i in range(num_bits):
        if v[i] > 0:
            fingerprint |= (1 << i)
    hex_length = num_bits // 4
    return format(fingerprint, f'0{hex_length}x')

def hamming_distance(hash1: str, hash2: str) -> int:
    return bin(int(hash1, 16) ^ int(hash2, 16)).count('1')


# ---- Corpus -------------------------------------------------------------------

SIGMA = "\u03a3"
ALL_CHARS = [chr(cp) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
WHITESPACE = [c for c in ALL_CHARS if c.isspace()]
CASE_CHANGING = [c for c in ALL_CHARS if c.lower() != c]
# Python's case-ignorable / cased chars, probed as in gen_python_unicode_tables.py.
CASE_IGNORABLE = [c for c in ALL_CHARS if ("A" + c + SIGMA).lower()[-1] == "\u03c2"
                  and (c + SIGMA).lower()[-1] != "\u03c2"]
CASED = [c for c in ALL_CHARS if (c + SIGMA).lower()[-1] == "\u03c2"]

# Code points where Rust 1.95's std (Unicode 17) disagrees with CPython 3.11
# (Unicode 14) on lowercasing, whitespace, cased or case-ignorable: chars added
# after Unicode 14 (e.g. U+1C89, U+A7CB, U+A7DC, Garay U+10D50.., Beria Erfe
# U+16EA0..), plus U+0295 (no longer cased) and U+1171E (no longer case-ignorable).
RUST_STD_DIFFERS = [
    (0x1C, 0x1F), (0x295, 0x295), (0x897, 0x897), (0xECE, 0xECE), (0x1ACF, 0x1ADD),
    (0x1AE0, 0x1AEB), (0x1C89, 0x1C8A), (0xA7CB, 0xA7CF), (0xA7D2, 0xA7D2), (0xA7D4, 0xA7D4),
    (0xA7DA, 0xA7DC), (0xA7F1, 0xA7F1), (0x10D4E, 0x10D4E), (0x10D50, 0x10D65),
    (0x10D69, 0x10D6D), (0x10D6F, 0x10D85), (0x10EC5, 0x10EC5), (0x10EFA, 0x10EFF),
    (0x11241, 0x11241), (0x113BB, 0x113C0), (0x113CE, 0x113CE), (0x113D0, 0x113D0),
    (0x113D2, 0x113D2), (0x113E1, 0x113E2), (0x1171E, 0x1171E), (0x11B60, 0x11B60),
    (0x11B62, 0x11B64), (0x11B66, 0x11B66), (0x11DD9, 0x11DD9), (0x11F00, 0x11F01),
    (0x11F36, 0x11F3A), (0x11F40, 0x11F40), (0x11F42, 0x11F42), (0x11F5A, 0x11F5A),
    (0x13439, 0x13440), (0x13447, 0x13455), (0x1611E, 0x16129), (0x1612D, 0x1612F),
    (0x16D40, 0x16D42), (0x16D6B, 0x16D6C), (0x16EA0, 0x16EB8), (0x16EBB, 0x16ED3),
    (0x16FF2, 0x16FF3), (0x1DF25, 0x1DF2A), (0x1E030, 0x1E06D), (0x1E08F, 0x1E08F),
    (0x1E4EB, 0x1E4EF), (0x1E5EE, 0x1E5EF), (0x1E6E3, 0x1E6E3), (0x1E6E6, 0x1E6E6),
    (0x1E6EE, 0x1E6EF), (0x1E6F5, 0x1E6F5), (0x1E6FF, 0x1E6FF),
]

HAND_PICKED = [
    "", " ", "\t\n\r\x0b\x0c", ".", "...", " . , ! ? ; : ", "!?", "a", "A", "Hello World!!!",
    "Hello World", "hello   world", "  Hello, World.  ", "Hello World!!! ", "Hello World !!!",
    "a .", "a . .", "x.,!?;:", "x.,!?;:y", "end\u3002", "end\uff01", "end\u2026", "why?!",
    "The quick brown fox jumps over the lazy dog.", "THE QUICK BROWN FOX", "0123456789",
    "~`@#$%^&*()_+-=[]{}|\\'\"<>/", "tab\tseparated\tvalues", "line\nbreaks\r\nhere",
    "unit\x1fsep\x1erecord\x1dgroup\x1cfile", "\x1c\x1d\x1e\x1f", "nbsp\xa0here", "ideo\u3000space",
    "nel\x85here", "ogham\u1680space", "zero\u200bwidth", "zwnj\u200cand\u200dzwj", "bom\ufeffhere",
    "mongolian\u180evowel", "word\u2060joiner", "narrow\u202fnbsp", "line\u2028para\u2029sep",
    "\u0130stanbul", "\u0130", "I\u0131i\u0130", "D\u0130YARBAKIR", "\u0131\u0130\u0069\u0049",
    "Stra\xdfe", "STRASSE", "\u1e9e", "GRO\u1e9e", "\u1e9e\xdf",
    "\u039f\u0394\u039f\u03a3", "\u039f\u0394\u039f\u03a3.", "\u039f\u0394\u039f\u03a3 \u039f\u0394\u039f\u03a3",
    "\u03a3", "\u03a3.", " \u03a3 ", "\u03a3\u03a3", "\u03a3\u03a3\u03a3", "\u0391\u03a3", "\u0391\u03a3\u0391",
    "\u0391\u03a3\u0384\u0391", "\u0391\u03a3\u0384", "\u0391\u0384\u03a3", "\u0391'\u03a3", "\u0391'\u03a3'",
    "\u0391\u03a3'\u0391", "\u0391\u03a3\u0301", "\u0391\u0301\u03a3", "\u0391\u0301\u0301\u03a3\u0301\u0301",
    "\u0391\u0301\u03a3\u0301\u0391", "\u0391.\u03a3", "\u0391:\u03a3:\u0391", "\u02b0\u03a3",
    "\u0391\u02b0\u03a3", "\u0391\u03a3\u02b0", "\u0391\u03a3\u0345", "\u0345\u03a3", "1\u03a3", "\u0391\u03a31",
    "\u0391\u03a3\u200d", "\u0391\u200d\u03a3", "\u0391\u00ad\u03a3", "\u0391\u03a3\u00ad\u0391",
    "\u0295\u03a3", "\u0391\U0001171e\u03a3", "\u0391\u03a3\U0001171e\u0391",
    "\u039c\u0399\u039a\u03a1\u039f\u03a3 \u039a\u039f\u03a3\u039c\u039f\u03a3!", "\u1f08\u03a3 \u1fbc\u03a3",
    "\u13a0\u13a1\u13a2 \uab70\uab71", "\u13f5\u13f8", "\u1c90\u1c91\u1cbd\u1cbe\u1cbf \u10d0",
    "\u2c00\u2c01\u2c2e\u2c2f \u2c30", "\U00010400\U00010401\U00010427", "\U000104b0\U000104d3",
    "\U00010570\U00010595", "\U00010c80\U00010cb2", "\U000118a0\U000118bf", "\U00016e40\U00016e5f",
    "\U0001e900\U0001e921", "\u2160\u216f \u24b6\u24cf", "\uff21\uff3a", "\u0149\u01c5\u01c8\u01cb\u01f2",
    "\u1e9b\u1fbc\u1fcc\u1ffc", "\u2126\u212a\u212b", "\u0345\u03c2\u03d0", "\u1c89\u1c8a", "\ua7cb\ua7dc",
    "\ua7da\ua7db", "\U00010d50\U00010d70",
    "e\u0301 \u00e9 E\u0301", "\u0041\u030a\u212b\u00c5", "a\u0300\u0301\u0302\u0303\u0304",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family", "\U0001f44d\U0001f3fd!",
    "\U0001f1fa\U0001f1f8 flag", "\u2764\ufe0f love", "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd!",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645\u061f", "\u202eRTL\u202c override",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3002", "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\U0010ffff\U000e0001\U000f0000", "\x00null\x00", "\x7f\x80\x9f",
]


def random_corpus(rng):
    """Random strings drawn from the full code-point range and from case-heavy blocks."""
    case_blocks = [
        (0x00C0, 0x024F), (0x0250, 0x02FF), (0x0300, 0x036F), (0x0370, 0x03FF), (0x0400, 0x052F),
        (0x0531, 0x058F), (0x10A0, 0x10FF), (0x13A0, 0x13FF), (0x1C80, 0x1CBF), (0x1E00, 0x1FFF),
        (0x2100, 0x218F), (0x24B6, 0x24E9), (0x2C00, 0x2CFF), (0xA640, 0xA69F), (0xA720, 0xA7FF),
        (0xAB70, 0xABBF), (0xFF21, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104FF),
        (0x10570, 0x105BF), (0x10C80, 0x10CFF), (0x10D40, 0x10D8F), (0x118A0, 0x118FF),
        (0x16E40, 0x16E9F), (0x1E900, 0x1E95F),
    ]
    specials = WHITESPACE + list(".,!?;:'") + [SIGMA, "\u0130", "\u200d", "\u0301", "\u0345", "\u02b0"]

    def any_char(limit):
        while True:
            cp = rng.randrange(limit)
            if not 0xD800 <= cp <= 0xDFFF:
                return chr(cp)

    pools = [
        lambda: any_char(0x110000),
        lambda: any_char(0x10000),
        lambda: chr(rng.randint(*rng.choice(case_blocks))),
        lambda: rng.choice(CASE_IGNORABLE),
        lambda: rng.choice(specials),
        lambda: chr(rng.randrange(0x20, 0x7F)),
    ]
    full_range = ["".join(any_char(0x110000) for _ in range(rng.randrange(1, 12))) for _ in range(1000)]
    mixed = []
    for _ in range(1500):
        weights = [rng.randrange(4) for _ in pools]
        weights[rng.randrange(len(pools))] += 1
        mixed.append("".join(rng.choices(pools, weights)[0]() for _ in range(rng.randrange(1, 24))))
    return full_range + mixed


def corpus():
    cases = list(HAND_PICKED)
    for ws in WHITESPACE:
        cases += [f"a{ws}b{ws}", f"{ws}{ws}X.{ws}", ws]
    for first, last in RUST_STD_DIFFERS:
        for cp in range(first, last + 1):
            c = chr(cp)
            cases.append(f"{c} \u0391{c}\u03a3 {c}\u03a3 \u0391\u03a3{c} \u0391\u03a3{c}\u0391")
    # Every char str.lower() changes, sixteen per line.
    cases += ["".join(CASE_CHANGING[i:i + 16]) for i in range(0, len(CASE_CHANGING), 16)]
    # Both ends of every case-ignorable and cased run, in every sigma context.
    for chars in (CASE_IGNORABLE, CASED):
        ends = sorted({c for i, c in enumerate(chars)
                       if i == 0 or i == len(chars) - 1
                       or ord(chars[i - 1]) != ord(c) - 1 or ord(chars[i + 1]) != ord(c) + 1})
        for i in range(0, len(ends), 6):
            cases.append(" ".join(f"\u0391{c}\u03a3 \u0391\u03a3{c}\u0391 {c}\u03a3" for c in ends[i:i + 6]))
    cases += random_corpus(random.Random(0x5EED_2024))
    return list(dict.fromkeys(cases))  # drop duplicates, keep order


def main():
    with open(OUT, "w", encoding="ascii", newline="\n") as f:
        for text in corpus():
            record = {
                "input": text,
                "normalized": normalize_content(text),
                "content_hash": compute_content_hash(text),
                "semantic_hash": compute_semantic_hash(text),
            }
            f.write(json.dumps(record, ensure_ascii=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
