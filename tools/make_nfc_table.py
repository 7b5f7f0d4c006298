#!/usr/bin/env python3
"""Unicode NFC tables for src/tokenizer/nfc.rs, written to src/tokenizer/nfc_tables.rs.

What we must match is the NFC step of transformers' CLIPTokenizer, i.e. `tokenizers`'
`normalizers.NFC()` (Rust crate unicode-normalization-alignments 0.1.12), not Python's
`unicodedata.normalize("NFC", ...)`. That crate's tables are Unicode 9.0.0; Python 3.11's
unicodedata is Unicode 14.0.0. Canonical decompositions, combining classes and composition
exclusions never change for an assigned code point (Unicode stability policy), so the reference's
data is Python's data restricted to the code points the reference knows. The data is read from
`unicodedata`; which entries the reference lacks (code points assigned after its version) is
measured by running `tokenizers` itself, the way `make_tokenizer_fixtures.py --rust-tables` measures
the regex classes:

  combining class c > 0   kept if the reference reorders `a` + U+0345 (class 240) + c
                          (or `a` + c + U+0334 (class 1) for c = 240) under NFD;
  decomposition           kept if the reference's NFD changes the code point;
  composition a + b -> c  kept if the reference's NFC turns a + b into c.

Emitted, each sorted by its first column for binary search (Hangul syllables are algorithmic and
not in the tables):

  COMBINING_CLASS         (first, last, class): runs of code points with one nonzero class;
  SINGLETON_DECOMPOSITION (code point, replacement): one-code-point canonical decompositions,
                          which never recompose (e.g. U+212B ANGSTROM SIGN -> U+00C5);
  PAIR_DECOMPOSITION      (code point, first, second): one level; the first part may decompose
                          again (U+1E08 -> U+00C7 U+0301 -> C U+0327 U+0301);
  COMPOSITION_EXCLUDED    pair decompositions that NFC does not recompose (the composition
                          exclusions and the non-starter decompositions); every other pair does.

Before writing, a Python port of src/tokenizer/nfc.rs running on exactly these tables is checked
against the reference on the SWEEPS below (every code point alone and after `a`, every pair of
combining marks, all Hangul L+V+T and syllable+T sequences, every composition pair, and seeded
random mark soups); any difference aborts. The same sweeps, hashed, are in
tests/fixtures/tokenizer_cases.json (written by make_tokenizer_fixtures.py) for the Rust test.

Usage: /work/venv/bin/python tools/make_nfc_table.py [--check]
  --check   regenerate in memory and fail if src/tokenizer/nfc_tables.rs differs.
"""

import os
import random
import sys
import unicodedata

import tokenizers
from tokenizers import normalizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "src", "tokenizer", "nfc_tables.rs")

# What the measured reference is built from (tokenizers' bindings/python/Cargo.lock pins the
# crate; the crate's tables.rs declares the Unicode version). Recorded in the generated header.
REFERENCE_CRATE = "unicode-normalization-alignments 0.1.12"
REFERENCE_UNICODE = "9.0.0"

REF_NFC = normalizers.NFC()
REF_NFD = normalizers.NFD()

S_BASE, L_BASE, V_BASE, T_BASE = 0xAC00, 0x1100, 0x1161, 0x11A7
L_COUNT, V_COUNT, T_COUNT = 19, 21, 28
N_COUNT = V_COUNT * T_COUNT
S_COUNT = L_COUNT * N_COUNT

# Inputs below this code point are NFC already (asserted in build_tables), so nfc() returns them
# unchanged without decomposing: the whole of ASCII and Latin-1 text takes that path.
STABLE_BELOW = 0x300


def scalars():
    return [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]


def ref_nfc_batch(strings):
    """The reference's NFC of each string, in one call per 4096 strings: U+0000 is a starter that
    composes with nothing, so NFC of the NUL-joined strings is the NUL-join of their NFCs (the
    callers never pass strings containing U+0000)."""
    out = []
    for i in range(0, len(strings), 4096):
        chunk = strings[i : i + 4096]
        parts = REF_NFC.normalize_str("\0".join(chunk)).split("\0")
        assert len(parts) == len(chunk)
        out.extend(parts)
    return out


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def python_data():
    """Unicode data as Python's unicodedata has it: combining classes, canonical decompositions
    (one level), and the pairs that NFC recomposes."""
    ccc, singles, pairs = {}, {}, {}
    for cp in scalars():
        c = chr(cp)
        if unicodedata.combining(c):
            ccc[cp] = unicodedata.combining(c)
        d = unicodedata.decomposition(c)
        if d and not d.startswith("<"):
            parts = [int(x, 16) for x in d.split()]
            if len(parts) == 1:
                singles[cp] = parts[0]
            else:
                assert len(parts) == 2, (hex(cp), d)
                pairs[cp] = tuple(parts)
    return ccc, singles, pairs


def restrict_to_reference(ccc, singles, pairs):
    """Drops what the reference does not know; returns the kept data and the dropped code points."""
    marks = sorted(ccc)
    probes = [("a\u0345" + chr(cp)) if ccc[cp] < 240 else ("a" + chr(cp) + "\u0334") for cp in marks]
    unknown = set()
    for cp, probe in zip(marks, probes):
        got = REF_NFD.normalize_str(probe)
        if got == probe:  # not reordered: class 0 in the reference
            unknown.add(cp)
        else:
            assert got == unicodedata.normalize("NFD", probe), (hex(cp), got)
    ccc = {cp: k for cp, k in ccc.items() if cp not in unknown}

    def known_decomposition(cp):
        got = REF_NFD.normalize_str(chr(cp))
        if got == chr(cp):
            return False
        assert got == unicodedata.normalize("NFD", chr(cp)), hex(cp)
        return True

    dropped_decomp = {cp for cp in list(singles) + list(pairs) if not known_decomposition(cp)}
    singles = {cp: v for cp, v in singles.items() if cp not in dropped_decomp}
    pairs = {cp: v for cp, v in pairs.items() if cp not in dropped_decomp}
    return ccc, singles, pairs, unknown, dropped_decomp


def build_tables():
    ccc, singles, pairs = python_data()
    ccc, singles, pairs, unknown_ccc, dropped_decomp = restrict_to_reference(ccc, singles, pairs)

    # Which pair decompositions recompose, per the reference (Python's answer differs only for
    # code points the reference lacks, already dropped; asserted).
    items = sorted(pairs.items())
    ref = ref_nfc_batch([chr(a) + chr(b) for _, (a, b) in items])
    excluded = []
    for (cp, (a, b)), got in zip(items, ref):
        composes = got == chr(cp)
        assert composes == (unicodedata.normalize("NFC", chr(a) + chr(b)) == chr(cp)), hex(cp)
        if not composes:
            excluded.append(cp)

    # The fast path of nfc(): nothing below STABLE_BELOW has a class, is the second half of a
    # composition, or changes under NFC; and a decomposition of such a code point ends in
    # non-starters, so it cannot compose with what follows.
    tables = Tables(ccc, singles, pairs, set(excluded))
    for cp in range(STABLE_BELOW):
        assert cp not in ccc and cp not in singles, hex(cp)
        assert nfc_port(chr(cp), tables) == chr(cp), hex(cp)
        tail = tables.decompose(cp)[1:]
        assert all(tables.ccc.get(t, 0) for t in tail), hex(cp)
    assert all(b >= STABLE_BELOW for (_, b) in tables.compose), "fast path threshold too high"
    assert min(ccc) >= STABLE_BELOW
    return tables, unknown_ccc, dropped_decomp


class Tables:
    def __init__(self, ccc, singles, pairs, excluded):
        self.ccc, self.singles, self.pairs, self.excluded = ccc, singles, pairs, excluded
        self.compose = {ab: cp for cp, ab in pairs.items() if cp not in excluded}

    def decompose(self, cp):
        if S_BASE <= cp < S_BASE + S_COUNT:
            s = cp - S_BASE
            out = [L_BASE + s // N_COUNT, V_BASE + (s % N_COUNT) // T_COUNT]
            if s % T_COUNT:
                out.append(T_BASE + s % T_COUNT)
            return out
        if cp in self.singles:
            return self.decompose(self.singles[cp])
        if cp in self.pairs:
            a, b = self.pairs[cp]
            return self.decompose(a) + self.decompose(b)
        return [cp]

    def compose_pair(self, a, b):
        if L_BASE <= a < L_BASE + L_COUNT and V_BASE <= b < V_BASE + V_COUNT:
            return S_BASE + ((a - L_BASE) * V_COUNT + (b - V_BASE)) * T_COUNT
        if S_BASE <= a < S_BASE + S_COUNT and (a - S_BASE) % T_COUNT == 0 and T_BASE < b < T_BASE + T_COUNT:
            return a + (b - T_BASE)
        return self.compose.get((a, b))


def nfc_port(text, t):
    """src/tokenizer/nfc.rs, step for step (decompose, stable-sort each run of non-starters by
    class, compose with the last starter unless blocked)."""
    chars = [(d, t.ccc.get(d, 0)) for c in text for d in t.decompose(ord(c))]
    i = 0
    while i < len(chars):
        if chars[i][1] == 0:
            i += 1
            continue
        j = i
        while j < len(chars) and chars[j][1] != 0:
            j += 1
        chars[i:j] = sorted(chars[i:j], key=lambda x: x[1])
        i = j
    out, starter = [], None
    for c, k in chars:
        if starter is not None:
            adjacent = starter == len(out) - 1
            if adjacent or out[-1][1] < k:
                composed = t.compose_pair(out[starter][0], c)
                if composed is not None:
                    out[starter] = (composed, 0)
                    continue
        if k == 0:
            starter = len(out)
        out.append((c, k))
    return "".join(chr(c) for c, _ in out)


# ---------------------------------------------------------------------------------------------
# Sweeps: shared with make_tokenizer_fixtures.py (hashed there for the Rust test)
# ---------------------------------------------------------------------------------------------

SWEEP_CHUNK = 65536


def mark_ranges():
    """Runs of code points with a nonzero class in Python's (newer) data: the sweep over pairs of
    marks also covers marks the reference does not know."""
    ranges = []
    for cp in scalars():
        if unicodedata.combining(chr(cp)):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    return ranges


def sweep_inputs(name, marks):
    """The input strings of one sweep, in order. Mirrored by `sweep_inputs` in tests/tokenizer.rs;
    change both together."""
    all_cps = scalars()
    if name == "single":  # every code point alone: decompositions, singletons, exclusions
        return [chr(cp) for cp in all_cps]
    if name == "after_a":  # every code point after a composing base, then a class-1 mark
        return ["a" + chr(cp) + "\u0334" for cp in all_cps]
    if name == "mark_pairs":  # `a` + every ordered pair of marks: classes, reordering, blocking
        ms = [cp for lo, hi in marks for cp in range(lo, hi + 1)]
        return ["a" + chr(m1) + chr(m2) for m1 in ms for m2 in ms]
    if name == "hangul_lvt":  # conjoining jamo one past each end of the L, V and T ranges
        return [
            chr(l) + chr(v) + chr(t)
            for l in range(L_BASE - 1, L_BASE + L_COUNT + 1)
            for v in range(V_BASE - 1, V_BASE + V_COUNT + 1)
            for t in range(T_BASE - 1, T_BASE + T_COUNT + 1)
        ]
    if name == "hangul_syllable_t":  # every syllable (LV and LVT) followed by every T and neighbours
        return [
            chr(s) + chr(t)
            for s in range(S_BASE, S_BASE + S_COUNT)
            for t in range(T_BASE - 1, T_BASE + T_COUNT + 1)
        ]
    raise ValueError(name)


SWEEPS = ["single", "after_a", "mark_pairs", "hangul_lvt", "hangul_syllable_t"]


def fnv1a64(data, h=0xCBF29CE484222325):
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def sweep_chunks(inputs):
    """Chunks of SWEEP_CHUNK inputs, each input followed by U+0000 (a starter that composes with
    nothing, so the NFC of a chunk is the concatenation of its inputs' NFCs)."""
    for i in range(0, len(inputs), SWEEP_CHUNK):
        yield "".join(s + "\0" for s in inputs[i : i + SWEEP_CHUNK])


def composition_pair_inputs():
    """Every canonical pair decomposition of Python's data, decomposed one level and fully."""
    _, _, pairs = python_data()
    out = []
    for cp, (a, b) in sorted(pairs.items()):
        out.append(chr(a) + chr(b))
        out.append(unicodedata.normalize("NFD", chr(cp)))
    return out


def random_soups(n=200000, seed=9):
    """Seeded random sequences of bases, marks of many classes, jamo and composites."""
    rng = random.Random(seed)
    pool = (
        [chr(c) for c in range(0x41, 0x5B)] + list("aeiouyw \u03b1\u03b5\u03b7\u03c9\u0391")
        + [chr(c) for c in range(0x300, 0x370)] + list("\u0591\u05b0\u05bc\u0654\u0670\u093c\u094d")
        + list("\u0b47\u0b3e\u0b56\u0b57\u0bc6\u0bbe\u0cbf\u0cd5\u0d46\u0d3e\u0dd9\u0dca\u1b05\u1b35")
        + list("\u1100\u1112\u1161\u1175\u11a7\u11a8\u11c2\u11c3\uac00\uac01\ud7a3")
        + list("\u00c5\u212b\u1e08\u0344\u0f73\u0958\u2adc\u1f71\u037e\u3099\u309a\u304b\u30cf")
        + ["\U00011935", "\U00011930", "\U0001d15e", "\U0001d165", "\U0001d16e", "\u1ab0", "\u1ac0"]
    )
    return ["".join(rng.choice(pool) for _ in range(rng.randrange(1, 9))) for _ in range(n)]


def verify(tables):
    """Python port on the emitted tables == reference on every sweep; returns how many inputs of
    each sweep Python's own unicodedata (newer Unicode) answers differently."""
    marks = mark_ranges()
    newer = {}
    batches = [(name, sweep_inputs(name, marks)) for name in SWEEPS]
    batches += [("composition_pairs", composition_pair_inputs()), ("random", random_soups())]
    for name, inputs in batches:
        inputs = [s for s in inputs if "\0" not in s]
        ref = ref_nfc_batch(inputs)
        bad = [(s, r) for s, r in zip(inputs, ref) if nfc_port(s, tables) != r]
        if bad:
            sys.exit(f"{name}: port differs from the reference on {len(bad)} inputs, e.g. "
                     + ", ".join(f"{[hex(ord(c)) for c in s]} -> {[hex(ord(c)) for c in r]}" for s, r in bad[:5]))
        newer[name] = sum(unicodedata.normalize("NFC", s) != r for s, r in zip(inputs, ref))
        print(f"  {name}: {len(inputs)} inputs equal to the reference "
              f"({newer[name]} where Python's unicodedata {unicodedata.unidata_version} differs)")
    return newer


# ---------------------------------------------------------------------------------------------
# Rust output
# ---------------------------------------------------------------------------------------------


def rows(entries, per_line):
    lines = []
    for i in range(0, len(entries), per_line):
        lines.append("    " + " ".join(entries[i : i + per_line]))
    return "\n".join(lines)


def render(tables, unknown_ccc, dropped_decomp):
    ccc_runs = []
    for cp in sorted(tables.ccc):
        k = tables.ccc[cp]
        if ccc_runs and ccc_runs[-1][1] == cp - 1 and ccc_runs[-1][2] == k:
            ccc_runs[-1][1] = cp
        else:
            ccc_runs.append([cp, cp, k])
    singles = sorted(tables.singles.items())
    pairs = sorted(tables.pairs.items())
    excluded = sorted(tables.excluded)
    py = f"Python {sys.version.split()[0]} unicodedata {unicodedata.unidata_version}"
    return f"""\
// @generated by tools/make_nfc_table.py: regenerate rather than edit.
//
// Unicode {REFERENCE_UNICODE} canonical data for NFC, as `tokenizers` {tokenizers.__version__} applies it
// ({REFERENCE_CRATE}, Unicode {REFERENCE_UNICODE}). Read from
// {py}, less what the reference lacks, measured with `tokenizers`:
// code points assigned after Unicode {REFERENCE_UNICODE}, i.e. the classes of {len(unknown_ccc)} marks and
// {len(dropped_decomp)} decomposition(s) ({", ".join(f"U+{cp:04X}" for cp in sorted(dropped_decomp))}). Checked against the reference by the generator and by
// tests/tokenizer.rs.

/// Unicode version of these tables (that of the reference, `tokenizers`' NFC).
pub const UNICODE_VERSION: &str = "{REFERENCE_UNICODE}";

/// Text made only of code points below this is NFC already (checked by the generator).
pub(super) const STABLE_BELOW: u32 = 0x{STABLE_BELOW:X};

/// Canonical combining classes: (first, last, class) runs, {len(ccc_runs)} of them; absent = 0.
#[rustfmt::skip]
pub(super) const COMBINING_CLASS: &[(u32, u32, u8)] = &[
{rows([f"(0x{a:X}, 0x{b:X}, {k})," for a, b, k in ccc_runs], 4)}
];

/// One-code-point canonical decompositions ({len(singles)}); they never recompose.
#[rustfmt::skip]
pub(super) const SINGLETON_DECOMPOSITION: &[(u32, u32)] = &[
{rows([f"(0x{a:X}, 0x{b:X})," for a, b in singles], 6)}
];

/// Two-code-point canonical decompositions, one level ({len(pairs)}): (code point, first, second).
#[rustfmt::skip]
pub(super) const PAIR_DECOMPOSITION: &[(u32, u32, u32)] = &[
{rows([f"(0x{cp:X}, 0x{a:X}, 0x{b:X})," for cp, (a, b) in pairs], 4)}
];

/// Code points of PAIR_DECOMPOSITION that NFC does not recompose ({len(excluded)}): composition
/// exclusions and non-starter decompositions.
#[rustfmt::skip]
pub(super) const COMPOSITION_EXCLUDED: &[u32] = &[
{rows([f"0x{cp:X}," for cp in excluded], 10)}
];
"""


def main():
    print(f"tokenizers {tokenizers.__version__}, Python unicodedata {unicodedata.unidata_version}")
    tables, unknown_ccc, dropped_decomp = build_tables()
    print(f"  reference lacks {len(unknown_ccc)} combining classes, {len(dropped_decomp)} decompositions: "
          + " ".join(f"{cp:X}" for cp in sorted(dropped_decomp)))
    verify(tables)
    text = render(tables, unknown_ccc, dropped_decomp)
    if "--check" in sys.argv:
        with open(OUT, encoding="utf-8") as f:
            if f.read() != text:
                sys.exit(f"{OUT} is stale: run tools/make_nfc_table.py")
        print(f"{OUT} is up to date")
        return
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {OUT}: {len(text.encode())} bytes")


if __name__ == "__main__":
    main()
