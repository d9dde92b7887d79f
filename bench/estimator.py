"""Measure quota_proxy.tokens against real BPE tokenizers, on real text found offline.

    python bench/estimator.py            # prints a Markdown report, writes bench/ESTIMATOR.md

The references are cl100k_base and o200k_base through `bpe_openai` (Rust, ships its own
rank files: nothing is downloaded). The text is whatever this machine already holds —
Python's standard library, Debian's docs, licences, man pages and gettext catalogues,
JSON data files — cut into samples of 200–4000 characters and grouped by category.
Nothing here is invented: a category whose files are missing is reported as missing.

For each category and encoding it reports the ratio estimate/real (median, p5, p95),
the share of samples where the estimate is *below* the real count, and the worst such
under-estimate; then the estimator's speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gettext
import gzip
import json
import math
import platform
import random
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))



def _tokens() -> ModuleType:
    """quota_proxy.tokens, imported late: --fit runs where the gateway is not installed."""
    import quota_proxy.tokens

    return quota_proxy.tokens


ENCODINGS = ("cl100k_base", "o200k_base")
MIN_CHARS, MAX_CHARS = 200, 4000
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SHARE = Path("/usr/share")

# Locale directories per script family (gettext catalogues and translated man pages).
SCRIPT_LANGS: dict[str, tuple[str, ...]] = {
    "latin-accented": ("de", "fr", "es", "pt_BR", "pl", "cs", "vi", "tr", "hu", "ro"),
    "cyrillic": ("ru", "uk", "bg", "sr", "be", "mk", "kk"),
    "cjk": ("zh_CN", "zh_TW", "zh_HK", "ja", "ko"),
    "arabic-hebrew": ("ar", "he", "fa", "ur", "ug"),
    "indic-thai": ("hi", "bn", "mr", "pa", "gu", "ta", "te", "kn", "ml", "ne", "th", "km"),
    "greek-georgian-armenian": ("el", "ka", "hy", "am"),
}


# --------------------------------------------------------------------------- corpus


def _read(path: Path) -> str | None:
    """A file's text, or None when it is not UTF-8 (we never guess an encoding)."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def _files(root: Path, patterns: Iterable[str]) -> list[Path]:
    if not root.is_dir():
        return []
    found: set[Path] = set()
    for pattern in patterns:
        found.update(p for p in root.glob(pattern) if p.is_file())
    return sorted(found)


def _spread(paths: list[Path], limit: int, rng: random.Random, depth: int = 1) -> list[Path]:
    """Up to `limit` paths, round-robin over parent directories so no one package dominates."""
    groups: dict[Path, list[Path]] = {}
    for p in paths:
        groups.setdefault(p.parents[depth - 1] if depth else p, []).append(p)
    for g in groups.values():
        rng.shuffle(g)
    keys = sorted(groups)
    rng.shuffle(keys)
    out: list[Path] = []
    while len(out) < limit and any(groups[k] for k in keys):
        for k in keys:
            if groups[k] and len(out) < limit:
                out.append(groups[k].pop())
    return out


def _mo_text(path: Path) -> str | None:
    """The translated strings of a gettext catalogue, one per line (headers and untranslated
    strings left out)."""
    try:
        with path.open("rb") as fp:
            catalog: dict[Any, str] = gettext.GNUTranslations(fp)._catalog  # type: ignore[attr-defined]
    except (OSError, ValueError, UnicodeDecodeError, LookupError):
        return None
    lines = []
    for key, value in catalog.items():
        msgid = key[0] if isinstance(key, tuple) else key
        if msgid and value and value != msgid:
            lines.append(value)
    return "\n".join(lines) or None


def _json_compact(path: Path) -> str | None:
    """A real JSON file re-serialised without whitespace — the shape tools/arguments arrive in."""
    text = _read(path)
    if text is None:
        return None
    try:
        return json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        return None


def _pydoc_topics() -> list[str]:
    """The Python language reference as plain text (shipped with pydoc)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [topics[k] for k in sorted(topics)]


@dataclass
class Source:
    description: str
    texts: Callable[[random.Random], Iterator[str]]
    per_file: int = 8  # pieces taken from one file, so no single file makes a category


def _from_files(paths: Callable[[], list[Path]], reader: Callable[[Path], str | None] = _read,
                limit: int = 200, depth: int = 1) -> Callable[[random.Random], Iterator[str]]:
    def gen(rng: random.Random) -> Iterator[str]:
        for p in _spread(paths(), limit, rng, depth):
            text = reader(p)
            if text:
                yield text
    return gen


def _locale_mo(langs: tuple[str, ...]) -> list[Path]:
    return [p for lang in langs for p in _files(SHARE / "locale" / lang / "LC_MESSAGES", ["*.mo"])]


def _locale_man(langs: tuple[str, ...]) -> list[Path]:
    return [p for lang in langs for p in _files(SHARE / "man" / lang, ["man*/*"])]


def sources() -> dict[str, list[Source]]:
    site = STDLIB / "site-packages"
    doc = SHARE / "doc"
    cats: dict[str, list[Source]] = {
        "prose": [
            Source("/usr/share/common-licenses/*", _from_files(lambda: _files(SHARE / "common-licenses", ["*"]))),
            Source("pydoc_data.topics (Python language reference)", lambda rng: iter(_pydoc_topics())),
        ],
        "docs (README/NEWS/md)": [
            Source("/usr/share/doc/*/{README,NEWS,*.md,*.txt,*.rst}",
                   _from_files(lambda: _files(doc, ["*/README*", "*/NEWS*", "*/*.md*", "*/*.txt*", "*/*.rst*"]))),
        ],
        "code-python": [
            Source(f"{STDLIB}/*.py", _from_files(lambda: _files(STDLIB, ["*.py", "*/*.py"]), depth=1)),
        ],
        "code-c": [
            Source("/usr/include/*.h", _from_files(lambda: _files(Path("/usr/include"), ["*.h", "*/*.h"]))),
            Source("/usr/share/doc/**/*.c", _from_files(lambda: _files(doc, ["**/*.c"]))),
        ],
        "code-js": [
            Source("/usr/share/javascript/**/*.js (not *.min.js)",
                   _from_files(lambda: [p for p in _files(SHARE / "javascript", ["**/*.js"])
                                        if not p.name.endswith(".min.js")], depth=2)),
        ],
        "markup (man/html)": [
            Source("/usr/share/man/man*/* (groff)", _from_files(lambda: _files(SHARE / "man", ["man*/*"]))),
            Source("/usr/share/doc/**/*.html", _from_files(lambda: _files(doc, ["**/*.html"]))),
        ],
        "json (as found)": [
            Source("*.json under the stdlib, site-packages and /usr/share",
                   _from_files(lambda: _json_paths(site), depth=2)),
        ],
        "json (compact)": [
            Source("the same files re-serialised with separators=(',', ':')",
                   _from_files(lambda: _json_paths(site), reader=_json_compact, depth=2)),
        ],
        "numbers/data": [
            Source(f"{STDLIB}/test/decimaltestdata/*.decTest",
                   _from_files(lambda: _files(STDLIB / "test" / "decimaltestdata", ["*.decTest"]))),
            Source("*.csv under site-packages", _from_files(lambda: _files(site, ["**/*.csv"]), depth=3)),
            Source("/etc/services, tzdata.zi",
                   _from_files(lambda: [p for p in (Path("/etc/services"), SHARE / "zoneinfo" / "tzdata.zi")
                                        if p.is_file()])),
        ],
    }
    for cat, langs in SCRIPT_LANGS.items():
        cats[cat] = [
            Source(f"/usr/share/locale/{{{','.join(langs)}}}/LC_MESSAGES/*.mo (translated strings, one per line)",
                   _from_files(partial(_locale_mo, langs), reader=_mo_text, depth=3)),
            Source("/usr/share/man/{lang}/man*/* (translated man pages)",
                   _from_files(partial(_locale_man, langs), depth=2)),
        ]
    cats["cjk"].append(Source(f"{STDLIB}/test/cjkencodings/*-utf8.txt",
                              _from_files(lambda: _files(STDLIB / "test" / "cjkencodings", ["*-utf8.txt"]))))
    cats["emoji"] = [
        Source("rich/_emoji_codes.py (emoji name table, as shipped)",
               _from_files(lambda: _files(site, ["**/rich/_emoji_codes.py"]), limit=1), per_file=10**6),
    ]
    return cats


def _json_paths(site: Path) -> list[Path]:
    return _files(site, ["**/*.json", "**/*.json.gz"]) + _files(SHARE, ["**/*.json"]) + _files(STDLIB / "test", ["**/*.json"])


def chunks(text: str, rng: random.Random) -> Iterator[str]:
    """Cut a text at line (else space, else any) boundaries into pieces of MIN..MAX chars,
    sizes log-uniform so short prompts are as well represented as long ones."""
    pos, n = 0, len(text)
    while n - pos >= MIN_CHARS:
        size = int(math.exp(rng.uniform(math.log(MIN_CHARS), math.log(MAX_CHARS))))
        end = min(pos + size, n)
        if end < n:
            cut = text.rfind("\n", pos + MIN_CHARS, end)
            if cut < 0:
                cut = text.rfind(" ", pos + MIN_CHARS, end)
            end = cut + 1 if cut >= 0 else end
        piece = text[pos:end]
        if piece.strip():
            yield piece
        pos = end


def collect(per_category: int, seed: int) -> dict[str, list[str]]:
    """Up to `per_category` samples per category, drawn from many files."""
    out: dict[str, list[str]] = {}
    for cat, srcs in sources().items():
        rng = random.Random(f"{seed}:{cat}")
        pool: list[str] = []
        for src in srcs:
            taken = 0
            for text in src.texts(rng):
                pieces = list(chunks(text, rng))
                rng.shuffle(pieces)
                for piece in pieces[: src.per_file]:
                    pool.append(piece)
                    taken += 1
                if taken >= 3 * per_category:
                    break
        rng.shuffle(pool)
        if pool:
            out[cat] = pool[:per_category]
    return out


# --------------------------------------------------------------------------- measure


@dataclass
class Row:
    category: str
    encoding: str
    ratios: list[float] = field(default_factory=list)
    worst_deficit: int = 0  # tokens short on the worst sample (0 = never under)
    est_total: int = 0
    real_total: int = 0


def _pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def measure(samples: dict[str, list[str]]) -> list[Row]:
    import bpe_openai

    estimate_text_tokens = _tokens().estimate_text_tokens
    encs = {name: bpe_openai.get_encoding(name) for name in ENCODINGS}
    rows: list[Row] = []
    pooled = {name: Row("**all samples**", name) for name in ENCODINGS}
    for cat, texts in samples.items():
        estimates = [estimate_text_tokens(t) for t in texts]
        for name, enc in encs.items():
            row = Row(cat, name)
            for text, est in zip(texts, estimates, strict=True):
                real = len(enc.encode_ordinary(text))
                if real == 0:
                    continue
                for r in (row, pooled[name]):
                    r.ratios.append(est / real)
                    r.worst_deficit = max(r.worst_deficit, real - est)
                    r.est_total += est
                    r.real_total += real
            rows.append(row)
    rows.extend(pooled.values())
    return rows


def _best_of(fn: Callable[..., object], *args: Any, repeat: int = 5) -> float:
    """Seconds for the fastest of `repeat` calls: a shared machine's other load only adds time."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def timing(samples: dict[str, list[str]]) -> list[tuple[str, float]]:
    """µs per KB of each category, and µs per call for a 2 KB English prompt and a chat body."""
    tokens = _tokens()
    estimate_text_tokens, estimate_prompt_tokens = tokens.estimate_text_tokens, tokens.estimate_prompt_tokens

    def each(texts: list[str]) -> None:
        for text in texts:
            estimate_text_tokens(text)

    out: list[tuple[str, float]] = []
    for cat, texts in samples.items():
        kb = sum(len(t.encode()) for t in texts) / 1024
        out.append((f"{cat}: µs per KB", _best_of(each, texts, repeat=7) / kb * 1e6))
    prose = "".join(samples.get("prose", []))
    ascii_prose = prose.encode("ascii", "ignore").decode()
    loops = 200  # per run; many short runs, so that one of them is undisturbed
    prompts = {
        "2 KB English prompt (ASCII): µs": ascii_prose[:2048],
        "2 KB English prompt, curly quotes and all: µs": prose.encode()[:2048].decode("utf-8", "ignore"),
    }
    for label, text in prompts.items():
        if text:
            out.append((label, _best_of(each, [text] * loops, repeat=50) / loops * 1e6))
    if prose:
        body = {"model": "m", "messages": [
            {"role": "system", "content": ascii_prose[:400]},
            {"role": "user", "content": ascii_prose[400:2048]},
        ]}

        def chat_bodies() -> None:
            for _ in range(loops):
                estimate_prompt_tokens(body, "chat")

        out.append(("2 KB two-message chat body (`estimate_prompt_tokens`): µs",
                    _best_of(chat_bodies, repeat=50) / loops * 1e6))
    return out


def render(rows: list[Row]) -> str:
    lines = [
        "| category | encoding | n | median est/real | p5 | p95 | under | lowest ratio | most tokens short | est/real (sum) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = sorted(r.ratios)
        under = sum(1 for x in s if x < 1)
        lines.append(
            f"| {r.category} | {r.encoding} | {len(s)} | {statistics.median(s):.2f} | {_pct(s, 0.05):.2f} | "
            f"{_pct(s, 0.95):.2f} | {100 * under / len(s):.1f}% | {s[0]:.2f} | "
            f"{r.worst_deficit if under else '—'} | {r.est_total / r.real_total:.2f} |"
        )
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """One sentence per encoding over all samples, for readers who stop here."""
    out = []
    for r in rows:
        if r.category.startswith("**all"):
            s = sorted(r.ratios)
            under = 100 * sum(1 for x in s if x < 1) / len(s)
            out.append(f"Against {r.encoding}, over all {len(s)} samples: median ratio {statistics.median(s):.2f}, "
                       f"below the real count in {under:.1f}% of samples, at worst {s[0]:.2f}.")
    return " ".join(out)


def render_timing(times: list[tuple[str, float]]) -> str:
    return "\n".join(["| timing (best run) | value |", "|---|---:|", *(f"| {k} | {v:.1f} |" for k, v in times)])


def sources_section(samples: dict[str, list[str]]) -> str:
    out = ["| category | samples | chars | sources |", "|---|---:|---:|---|"]
    for cat, srcs in sources().items():
        got = samples.get(cat, [])
        desc = "; ".join(s.description for s in srcs)
        out.append(f"| {cat} | {len(got)} | {sum(map(len, got))} | {desc} |")
    return "\n".join(out)


# --------------------------------------------------------------------------- fit

# Bounds for the fit: no rate below what the script plainly costs, no non-ASCII rate above
# the character's UTF-8 length (cl100k/o200k never spend more than a token per byte). A
# digit is pinned at one token: Qwen, Gemma, Llama 2 and Mistral 7B split every digit,
# where cl100k/o200k take three at a time.
FIT_BOUNDS: dict[str, tuple[float, float]] = {
    "upper": (0, 1), "words": (0.5, 1.5), "humps": (0, 1.5),
    "letters_acc": (0, 0.5), "upper_acc": (0, 1), "words_acc": (0.5, 1.5),
    "digits": (1, 1), "digit_runs": (0, 2), "punct": (0.25, 1), "newlines": (0.5, 2),
    "space_runs": (0, 1.5), "nonascii_words": (0, 2),
    "latin1": (0.5, 2), "latin_ext": (0.5, 2), "combining": (1, 2), "greek": (0.5, 2),
    "cyrillic": (0.5, 2), "armenian_hebrew": (0.5, 2), "arabic": (0.5, 2), "other2": (2, 2),
    "indic": (1, 3), "e1": (1, 3), "symbols": (0.5, 3), "kana": (1, 3), "cjk": (1, 3),
    "hangul": (1, 3), "compat": (1, 3), "astral": (2, 4), "vietnamese": (1, 3),
}  # fmt: skip


def dump(samples: dict[str, list[str]], path: Path) -> None:
    """Features and real counts of every sample, for --fit (which needs scipy, not bpe_openai)."""
    import bpe_openai

    tokens = _tokens()
    encs = {name: bpe_openai.get_encoding(name) for name in ENCODINGS}
    rows = []
    for cat, texts in samples.items():
        for text in texts:
            feats = list(tokens._features(text))
            rows.append({
                "category": cat,
                "features": feats + [0] * (len(tokens.FEATURES) - len(feats)),
                **{name: len(enc.encode_ordinary(text)) for name, enc in encs.items()},
            })
    path.write_text(json.dumps({"features": tokens.FEATURES, "samples": rows}), encoding="utf-8")


def fit(path: Path, target_under: float = 4.0, step: float = 0.05) -> dict[str, float]:
    """Rates minimising the mean ratio estimate/real (each category weighing the same),
    subject to estimate >= the larger real count, softened by a penalty per sample short;
    a category with more than target_under % of samples short gets a heavier penalty and
    the LP is solved again. Rates are then rounded *up* to `step`."""
    import numpy as np
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix, hstack, identity

    data = json.loads(path.read_text(encoding="utf-8"))
    names = data["features"]
    cats = np.array([r["category"] for r in data["samples"]])
    feats = np.array([r["features"] for r in data["samples"]], dtype=float)
    real = {e: np.array([r[e] for r in data["samples"]], dtype=float) for e in ENCODINGS}
    worst = np.maximum(*real.values())
    scaled = feats / worst[:, None]  # estimate / real, per unit of each rate
    n, m = scaled.shape
    per_cat = {c: int((cats == c).sum()) for c in set(cats)}
    weight = np.array([1 / per_cat[c] for c in cats])
    penalty = dict.fromkeys(per_cat, 20.0)
    bounds = [FIT_BOUNDS.get(name, (0, None)) for name in names] + [(0, None)] * n
    a_ub = hstack([csr_matrix(-scaled), -identity(n)]).tocsr()  # ratio + slack >= 1
    rates = np.zeros(m)
    for _ in range(12):
        cost = np.concatenate([(weight[:, None] * scaled).sum(0), np.array([penalty[c] for c in cats]) * weight])
        res = linprog(cost, A_ub=a_ub, b_ub=-np.ones(n), bounds=bounds, method="highs")
        rates = res.x[:m]
        est = feats @ rates
        done = True
        for c in per_cat:
            mask = cats == c
            short = max(100 * float((est[mask] < real[e][mask]).mean()) for e in ENCODINGS)
            if short > target_under:
                penalty[c] *= 1.6
                done = False
        if done:
            break
    return {name: round(math.ceil(r / step - 1e-9) * step, 4) for name, r in zip(names, rates, strict=True)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-category", type=int, default=600, help="samples per category (default 600)")
    ap.add_argument("--seed", type=int, default=20240601, help="which samples are drawn")
    ap.add_argument("--out", default=str(ROOT / "bench" / "ESTIMATOR.md"),
                    help="where to write the report ('-' to skip)")
    ap.add_argument("--dump", type=Path, help="write features and real counts to this JSON file, and stop")
    ap.add_argument("--fit", type=Path, help="fit rates to a --dump file (needs numpy and scipy), and stop")
    args = ap.parse_args(argv)

    if args.fit:
        rates = fit(args.fit)
        print("RATES = {\n" + "".join(f"    {k!r}: {v},\n" for k, v in rates.items()) + "}")
        return 0
    samples = collect(args.per_category, args.seed)
    if args.dump:
        dump(samples, args.dump)
        return 0
    rows = measure(samples)
    times = timing(samples)
    table, timing_table = render(rows), render_timing(times)
    print(table + "\n\n" + timing_table)

    if args.out != "-":
        import bpe_openai

        cmd = "python bench/estimator.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
        rates = ", ".join(f"{k} {v:g}" for k, v in _tokens().RATES.items())
        doc = "\n".join([
            "# Token estimator: measured error",
            "",
            "`quota_proxy.tokens` estimates token counts without a tokenizer (it runs on every",
            "request to size the balance hold, and meters replies whose upstream reported no usage).",
            "This is how far its estimate is from two real BPE tokenizers, on real text found on the",
            "build machine. *ratio* = estimate / real count; *under* = share of samples where the",
            "estimate is below the real count; *lowest ratio* and *most tokens short* are the worst",
            "samples (not necessarily the same one).",
            "",
            f"- command: `{cmd}` (from the repository root)",
            f"- date: {dt.date.today().isoformat()}; Python {platform.python_version()}; "
            f"bpe-openai {getattr(bpe_openai, '__version__', '?')}; seed {args.seed}",
            f"- samples: {MIN_CHARS}–{MAX_CHARS} characters (log-uniform), cut at line boundaries, up to "
            f"{args.per_category} per category, at most 8 per file (the one emoji file excepted)",
            "- the rates were fitted on a different draw (`--seed 7 --dump f.json`, then `--fit f.json`),",
            "  so these figures are out of sample (the files overlap, the samples hardly do)",
            f"- rates: {rates}",
            "",
            summary(rows),
            "",
            table,
            "",
            timing_table,
            "",
            "Timings are the best of many runs on the build machine, which was shared with other",
            "work: expect them to vary by tens of percent from run to run.",
            "",
            "## Samples",
            "",
            sources_section(samples),
            "",
        ])
        Path(args.out).write_text(doc, encoding="utf-8")
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
