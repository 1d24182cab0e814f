#!/usr/bin/env python3
"""Build the demo model's Japanese pretraining corpus from Debian's documentation packages.

Debian ships a lot of free Japanese prose (manuals, FAQs, man pages, help files).
This script fetches those packages, turns their HTML and roff into plain text,
keeps only Japanese prose, removes repeated boilerplate and duplicated paragraphs,
and writes one JSON object per source page: ``{"text": ..., "source": "package/path"}``.

The packages are *unpacked* (``apt-get download`` + ``dpkg-deb -x``) into a cache
folder rather than installed: installing them would pull in GIMP, LibreOffice,
LilyPond and a JDK as dependencies, and unpacking needs no root.  Pass
``--no-fetch`` to use folders already unpacked there.

    python recipes/demo/make_corpus.py --out ~/.cache/jneox/demo/corpus.jsonl

The corpus is not committed to the repository; this script makes it again.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from japanese import count_japanese, is_japanese_char, japanese_ratio  # noqa: E402

# Debian packages with Japanese prose, largest contributors first.  Checked with
# `apt-cache search -n -- -ja$` on Debian 12; firefox/thunderbird/libreoffice
# "l10n" packages only hold UI strings and are left out.
PACKAGES: tuple[str, ...] = (
    "gimp-help-ja",
    "libreoffice-help-ja",
    "lilypond-doc-html-ja",
    "kicad-doc-ja",
    "manpages-ja",
    "manpages-ja-dev",
    "scilab-doc-ja",
    "debian-reference-ja",
    "debian-edu-doc-ja",
    "developers-reference-ja",
    "debian-policy-ja",
    "maint-guide-ja",
    "debian-faq-ja",
    "aptitude-doc-ja",
)
# Also checked and left out: debian-edu-doc-legacy-ja and libjlha-java-doc-ja (API pages: nothing
# survives the prose filters).

DEFAULT_CACHE = Path.home() / ".cache" / "jneox" / "demo"

MIN_PARAGRAPH_JAPANESE_RATIO = 0.3  # a paragraph must be at least 30% kana/kanji/Japanese punctuation
MIN_PARAGRAPH_JAPANESE_CHARS = 8  # shorter paragraphs are headings, menu items, table cells
MIN_DOCUMENT_JAPANESE_CHARS = 80  # a page with less prose than this left is dropped
BOILERPLATE_MIN_DOCUMENTS = 4  # a short paragraph found in this many pages is navigation or a footer
BOILERPLATE_MAX_CHARS = 200  # longer repeated paragraphs are copies of a page (one-page editions): kept once
CODE_SYMBOLS = set("{}()[];=<>$#/\\|*&%@^~`\"'_+")
MAX_CODE_SYMBOL_RATIO = 0.2

# Man page sections that are lists of names, options syntax or licence text, not prose.
SKIPPED_MAN_SECTIONS = {
    "書式", "SYNOPSIS", "著作権", "COPYRIGHT", "ライセンス", "LICENSE", "著者", "作者", "AUTHOR",
    "AUTHORS", "関連項目", "SEE ALSO", "翻訳者", "訳者", "翻訳", "COLOPHON", "コロフォン", "履歴",
    "HISTORY", "バグ報告", "REPORTING BUGS", "準拠", "CONFORMING TO", "EXAMPLE", "EXAMPLES", "例",
}

# Paragraphs starting like these are licence or navigation text wherever they appear.
BOILERPLATE_PATTERNS = re.compile(
    r"^(copyright|©|\(c\)|this (program|document|manual) is free|permission is granted|"
    r"gnu (general|free|lesser)|著作権|この(文書|マニュアル|ページ)は.{0,40}(ライセンス|許諾|GPL|GNU)|"
    r"(前へ|次へ|ホーム|上へ|目次)(\s|$)|\[\s*[<>^]\s)",
    re.IGNORECASE,
)


# ---------------------------------------------------------------------------
# Fetching


def fetch_packages(packages: list[str], cache: Path) -> Path:
    """Download the .deb files into ``cache/debs`` and unpack each into ``cache/root/PACKAGE``."""
    debs, root = cache / "debs", cache / "root"
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        print(f"downloading {len(missing)} packages: {' '.join(missing)}", flush=True)
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    for package in packages:
        target = root / package
        if target.is_dir():
            continue
        (deb,) = sorted(debs.glob(f"{package}_*.deb"))[-1:]
        partial = root / f".{package}.partial"
        subprocess.run(["rm", "-rf", str(partial)], check=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True)
        partial.rename(target)
    return root


# ---------------------------------------------------------------------------
# Text helpers


def join_wrapped_lines(lines: list[str]) -> str:
    """Join lines of one paragraph: no space between two Japanese characters, one space otherwise.

    Source files wrap Japanese sentences anywhere; a space there would be a typo.
    """
    out = ""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if out and not (is_japanese_char(out[-1]) and is_japanese_char(line[0])):
            out += " "
        out += line
    return out


def clean_paragraph(paragraph: str) -> str:
    """Collapse whitespace; drop spaces the layout put between Japanese characters."""
    paragraph = re.sub(r"[ \t\r\f\v\u00a0]+", " ", paragraph).strip()
    return re.sub(r"(?<=[\u3000-\u9fff\uff00-\uffef]) (?=[\u3000-\u9fff\uff00-\uffef])", "", paragraph)


def looks_like_code(paragraph: str) -> bool:
    """Command lines, markup and program text: many programming symbols, or a shell prompt."""
    visible = [c for c in paragraph if not c.isspace()]
    if not visible:
        return True
    if re.match(r"^(\$|#|%|>>>|C:\\)\s", paragraph):
        return True
    return sum(c in CODE_SYMBOLS for c in visible) / len(visible) > MAX_CODE_SYMBOL_RATIO


def keep_paragraph(paragraph: str) -> bool:
    """Japanese prose only: enough Japanese characters, mostly Japanese, not code, not boilerplate."""
    return (
        count_japanese(paragraph) >= MIN_PARAGRAPH_JAPANESE_CHARS
        and japanese_ratio(paragraph) >= MIN_PARAGRAPH_JAPANESE_RATIO
        and not looks_like_code(paragraph)
        and not BOILERPLATE_PATTERNS.match(paragraph)
    )


def decode_bytes(data: bytes, declared: str | None = None) -> str:
    """Decode with the declared charset, else UTF-8, else the Japanese legacy encodings."""
    tried = [declared] if declared else []
    for encoding in [*tried, "utf-8", "euc_jp", "shift_jis", "iso2022_jp"]:
        try:
            return data.decode(encoding)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# HTML


class HtmlTextExtractor(HTMLParser):
    """Collect the paragraphs of an HTML page, skipping scripts, navigation and preformatted code."""

    BLOCK_TAGS = {
        "p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
        "table", "tr", "td", "th", "caption", "blockquote", "section", "article", "aside",
        "header", "footer", "main", "figure", "figcaption", "hr", "title", "body", "form",
    }
    SKIPPED_TAGS = {"script", "style", "head", "nav", "pre", "noscript", "svg", "math", "button", "select", "textarea"}
    SKIPPED_CLASSES = {
        "navheader", "navfooter", "navigation", "nav", "navbar", "footer", "header", "breadcrumb",
        "breadcrumbs", "toc", "sidebar", "sphinxsidebar", "related", "menu", "headerlink", "toctree-wrapper",
        "programlisting", "screen", "synopsis", "cmdsynopsis", "funcsynopsis", "literallayout", "listingblock",
        "highlight", "legalnotice", "copyright", "verbatim",
    }
    HEADING_TAGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
    VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "area", "base", "col", "embed", "param", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.headings: list[bool] = []  # for each paragraph: was it a heading (h1-h6)?
        self._lines: list[str] = []
        self._heading_depth = 0
        self._stack: list[tuple[str, bool]] = []  # (tag, skipped)

    @property
    def _skipping(self) -> bool:
        return any(skipped for _, skipped in self._stack)

    def _break(self) -> None:
        text = clean_paragraph(join_wrapped_lines(self._lines))
        if text:
            self.paragraphs.append(text)
            self.headings.append(self._heading_depth > 0)
        self._lines = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.BLOCK_TAGS:
            self._break()
        if tag in self.VOID_TAGS:
            return
        if tag in self.HEADING_TAGS:
            self._heading_depth += 1
        attributes = dict(attrs)
        skipped = (
            tag in self.SKIPPED_TAGS
            or not self.SKIPPED_CLASSES.isdisjoint((attributes.get("class") or "").lower().split())
            or (attributes.get("role") or "") in {"navigation", "banner", "contentinfo"}
            or (attributes.get("id") or "").lower() in {"header", "footer", "navigation", "nav", "toc", "sidebar"}
        )
        self._stack.append((tag, skipped))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.BLOCK_TAGS:
            self._break()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.BLOCK_TAGS:
            self._break()
        if tag in self.HEADING_TAGS and self._heading_depth > 0:
            self._heading_depth -= 1
        for index in range(len(self._stack) - 1, -1, -1):
            if self._stack[index][0] == tag:
                del self._stack[index:]
                break

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self._lines.extend(data.split("\n") if "\n" in data else [data])

    def close(self) -> None:
        super().close()
        self._break()


def parse_html(data: bytes) -> HtmlTextExtractor:
    """Parse an HTML page given as raw bytes, decoding it with its declared charset."""
    head = data[:4096].decode("ascii", errors="ignore")
    match = re.search(r"charset=[\"']?([A-Za-z0-9_\-]+)", head)
    text = decode_bytes(data, match.group(1) if match else None)
    parser = HtmlTextExtractor()
    parser.feed(text)
    parser.close()
    return parser


def html_paragraphs(data: bytes) -> list[str]:
    """Paragraphs of prose in an HTML page given as raw bytes."""
    return parse_html(data).paragraphs


# ---------------------------------------------------------------------------
# roff (man pages)

_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d+"), ""),  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # string interpolation
    (re.compile(r"\\\(em|\\\[em\]"), "—"),
    (re.compile(r"\\\(en|\\\[en\]"), "–"),
    (re.compile(r"\\\((aq|cq)|\\\[(aq|cq)\]"), "'"),
    (re.compile(r"\\\((dq|lq|rq)|\\\[(dq|lq|rq)\]"), '"'),
    (re.compile(r"\\\(bu|\\\[bu\]"), "・"),
    (re.compile(r"\\\(co|\\\[co\]"), "©"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),  # other named characters
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[ ~0]"), " "),
    (re.compile(r"\\[&,/:%|^c)]"), ""),
    (re.compile(r"\\[nkm](\[[^\]]*\]|\(..|.)"), ""),  # registers, marks, colours
    (re.compile(r"\\[hvwlLoXZbD]'[^']*'"), ""),  # motions and drawing
]
_ROFF_FONT_MACROS = {".B", ".I", ".SM", ".SB"}
_ROFF_ALTERNATING_MACROS = {".BR", ".RB", ".BI", ".IB", ".IR", ".RI"}
_ROFF_NOFILL_START = {".nf", ".EX", ".TS", ".EQ", ".PS"}
_ROFF_NOFILL_END = {".fi", ".EE", ".TE", ".EN", ".PE"}


def roff_unescape(text: str) -> str:
    for pattern, replacement in _ROFF_ESCAPES:
        text = pattern.sub(replacement, text)
    return text.replace("\\\\", "\\")


def _roff_arguments(rest: str) -> list[str]:
    return [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', rest)]


def man_paragraphs(data: bytes) -> list[str] | None:
    """Paragraphs of prose in a roff man page; None for a page that only points to another (``.so``)."""
    text = decode_bytes(data)
    paragraphs: list[str] = []
    lines: list[str] = []
    skipping_section = False
    nofill = False

    def flush() -> None:
        nonlocal lines
        if not skipping_section:
            paragraph = clean_paragraph(join_wrapped_lines(lines))
            if paragraph:
                paragraphs.append(paragraph)
        lines = []

    for raw in text.splitlines():
        if raw.startswith((".\\\"", "'\\\"", "\\\"", '.\\"')) or raw in {".", "'"}:
            continue
        if raw.startswith((".", "'")):
            macro, _, rest = raw.partition(" ")
            macro = "." + macro[1:].strip()
            if macro == ".so":
                return None
            if macro in _ROFF_NOFILL_START:
                flush()
                nofill = True
                continue
            if macro in _ROFF_NOFILL_END:
                nofill = False
                continue
            if nofill:
                continue
            if macro in {".SH", ".SS"}:
                flush()
                title = roff_unescape(" ".join(_roff_arguments(rest))).strip()
                if macro == ".SH":
                    skipping_section = title.upper() in SKIPPED_MAN_SECTIONS
                continue
            if macro in _ROFF_FONT_MACROS:
                lines.append(roff_unescape(" ".join(_roff_arguments(rest))))
                continue
            if macro in _ROFF_ALTERNATING_MACROS:
                lines.append(roff_unescape("".join(_roff_arguments(rest))))
                continue
            if macro in {".TP", ".PP", ".P", ".LP", ".IP", ".HP", ".RS", ".RE", ".sp", ".br", ".TH", ".bp"}:
                flush()
            continue  # any other request or macro carries no prose
        if nofill:
            continue
        lines.append(roff_unescape(raw))
    flush()
    return paragraphs


# ---------------------------------------------------------------------------
# Walking packages


@dataclass
class Page:
    source: str
    paragraphs: list[str]


def iter_pages(package: str, package_root: Path) -> Iterator[Page]:
    """Every page of prose in one unpacked package, in a stable order."""
    for path in sorted(p for p in package_root.rglob("*") if p.is_file()):
        relative = path.relative_to(package_root).as_posix()
        if "/usr/share/doc/" in "/" + relative and path.name.startswith(("changelog", "copyright", "README")):
            continue
        name = path.name.lower()
        if "/man/" in "/" + relative and re.search(r"\.\d\w*(\.gz)?$", name):
            data = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
            paragraphs = man_paragraphs(data)
            if paragraphs is not None:
                yield Page(f"{package}/{relative}", paragraphs)
        elif re.search(r"\.x?html?(\.gz)?$", name):
            data = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
            yield Page(f"{package}/{relative}", html_paragraphs(data))
        elif name.endswith((".jar", ".epub", ".zip")):
            with zipfile.ZipFile(path) as archive:
                for member in sorted(archive.namelist()):
                    if re.search(r"\.x?html?$", member.lower()):
                        yield Page(f"{package}/{relative}!{member}", html_paragraphs(archive.read(member)))


def paragraph_key(paragraph: str) -> bytes:
    """Hash of a paragraph with whitespace and case ignored, for deduplication."""
    return hashlib.blake2b(re.sub(r"\s+", "", paragraph).lower().encode(), digest_size=12).digest()


@dataclass
class CorpusStats:
    pages_read: int = 0
    documents: int = 0
    characters: int = 0
    bytes: int = 0
    paragraphs_kept: int = 0
    paragraphs_not_japanese: int = 0
    paragraphs_boilerplate: int = 0
    paragraphs_duplicate: int = 0
    per_package: dict[str, Counter] = field(default_factory=dict)


def build_corpus(packages: list[str], root: Path, out: Path) -> CorpusStats:
    """Extract, filter and deduplicate every package's pages and write the JSONL corpus atomically."""
    stats = CorpusStats()
    pages: list[tuple[str, Page]] = []
    documents_per_paragraph: Counter[bytes] = Counter()
    for package in packages:
        package_root = root / package
        if not package_root.is_dir():
            raise SystemExit(f"error: {package_root} is missing; run without --no-fetch to download it")
        count = 0
        for page in iter_pages(package, package_root):
            page.paragraphs = [p for p in page.paragraphs if p]
            stats.pages_read += 1
            count += 1
            pages.append((package, page))
            documents_per_paragraph.update({paragraph_key(p) for p in page.paragraphs})
        print(f"  read {package}: {count} pages", file=sys.stderr, flush=True)

    seen: set[bytes] = set()
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=".corpus.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as writer:
            for package, page in pages:
                package_stats = stats.per_package.setdefault(package, Counter())
                package_stats["pages"] += 1
                kept: list[str] = []
                for paragraph in page.paragraphs:
                    key = paragraph_key(paragraph)
                    if not keep_paragraph(paragraph):
                        stats.paragraphs_not_japanese += 1
                    elif (
                        documents_per_paragraph[key] >= BOILERPLATE_MIN_DOCUMENTS
                        and len(paragraph) <= BOILERPLATE_MAX_CHARS
                    ):
                        stats.paragraphs_boilerplate += 1
                    elif key in seen:
                        stats.paragraphs_duplicate += 1
                    else:
                        seen.add(key)
                        kept.append(paragraph)
                text = "\n".join(kept)
                if count_japanese(text) < MIN_DOCUMENT_JAPANESE_CHARS:
                    continue
                line = json.dumps({"text": text, "source": page.source}, ensure_ascii=False)
                writer.write(line + "\n")
                size = len(text.encode("utf-8"))
                stats.documents += 1
                stats.paragraphs_kept += len(kept)
                stats.characters += len(text)
                stats.bytes += size
                package_stats["documents"] += 1
                package_stats["bytes"] += size
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, out)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return stats


def print_stats(stats: CorpusStats, out: Path) -> None:
    print(f"{'package':28s} {'pages':>7s} {'documents':>10s} {'MB':>8s}")
    for package, counts in sorted(stats.per_package.items(), key=lambda kv: -kv[1]["bytes"]):
        print(f"{package:28s} {counts['pages']:7d} {counts['documents']:10d} {counts['bytes'] / 1e6:8.2f}")
    print(
        f"kept {stats.bytes / 1e6:.2f} MB ({stats.characters:,} characters) in {stats.documents:,} documents "
        f"from {stats.pages_read:,} pages -> {out}"
    )
    print(
        f"paragraphs: {stats.paragraphs_kept:,} kept, {stats.paragraphs_not_japanese:,} not Japanese prose, "
        f"{stats.paragraphs_boilerplate:,} boilerplate, {stats.paragraphs_duplicate:,} duplicates"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_CACHE / "corpus.jsonl", help="output JSONL file")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where .deb files are downloaded and unpacked")
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), help="Debian packages to use")
    parser.add_argument("--no-fetch", action="store_true", help="use the already unpacked packages in --cache/root")
    args = parser.parse_args(argv)
    root = args.cache / "root"
    if not args.no_fetch:
        root = fetch_packages(args.packages, args.cache)
    stats = build_corpus(args.packages, root, args.out)
    print_stats(stats, args.out)


if __name__ == "__main__":
    main()
