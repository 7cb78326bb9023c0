"""Build the shipped Python-docs corpus and the BERT and LLaMA SentencePiece models.

Reads the reST sources of the Python 3.11 documentation from the Debian package
python3-doc, strips the markup to plain prose, splits it into one document per
section and writes, under data/python_docs/:

  pretrain.jsonl      {"title", "content"} per section (capped at ~1.5 MB)
  instructions.jsonl  {"input", "target"} question/answer pairs from the sections
  spm_bert.model      SentencePiece unigram model, vocab 8000, ids 0-4 =
                      [PAD] [UNK] [CLS] [SEP] [MASK]
  spm_llama.model     SentencePiece BPE model, vocab 4000, ids 0-3 =
                      <unk> <s> </s> <pad> (the tiny LLaMA configs' tokenizer),
                      trained on the sections and the instructions

Usage:  python tools/build_corpus.py [--src DIR] [--out DIR]
Output is deterministic: same sources in, same bytes out.
"""
import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script without installing galaxy
from galaxy.data.tokenizer import train_sentencepiece  # noqa: E402

OUT = REPO / "data" / "python_docs"
DOCS = Path("/usr/share/doc/python3-doc/html/_sources")
MAX_PRETRAIN_BYTES = 1_500_000
VOCAB_SIZE = 8000
LLAMA_VOCAB_SIZE = 4000
MIN_CONTENT_CHARS = 150  # shorter sections are mostly a heading plus a link
MAX_TARGET_CHARS = 300

# Whole folders first (prose-heavy), then hand-picked library pages, in this
# order, until the byte cap is reached.
PARTS = [("tutorial", "the Python tutorial"), ("faq", "the Python FAQ"),
         ("howto", "the Python HOWTOs"), ("reference", "the Python language reference")]
LIBRARY_PAGES = [
    "intro", "functions", "stdtypes", "exceptions", "constants", "string", "re",
    "collections", "itertools", "functools", "operator", "pathlib", "os.path",
    "json", "csv", "datetime", "math", "random", "statistics", "decimal",
    "typing", "dataclasses", "enum", "contextlib", "abc", "copy", "pickle",
    "logging", "argparse", "unittest", "threading", "subprocess", "socket",
    "sqlite3", "sys", "time", "inspect", "weakref", "io", "os",
]
SKIP_PAGES = {"index", "clinic"}  # toctree-only pages; Argument Clinic is C-only

# Directive kinds. Admonitions keep their text; version notes become a sentence;
# object descriptions keep their signature and body. Every other directive
# (code-block, index, productionlist, tables, toctree, ...) is dropped whole.
ADMONITIONS = {"note", "warning", "seealso", "tip", "important", "attention",
               "caution", "impl-detail", "topic", "sidebar"}
VERSION_NOTES = {"versionadded": "New in version", "versionchanged": "Changed in version",
                 "deprecated": "Deprecated since version"}
OBJECTS = {"function", "method", "class", "attribute", "data", "exception",
           "decorator", "decoratormethod", "classmethod", "staticmethod",
           "abstractmethod", "coroutinefunction", "coroutinemethod", "describe",
           "awaitablefunction", "object"}
RULE_CHARS = set("=-~^*#\"+'`:.")

ROLE = re.compile(r":([\w:.-]+):`([^`]*)`")
TITLED_TARGET = re.compile(r"^(.*\S)\s*<[^<>]*>$")  # "title <target>" -> title
HYPERLINK = re.compile(r"`([^`<]*?)\s*(?:<[^`>]*>)?`__?")
NAMED_REF = re.compile(r"(?<!\w)([A-Za-z][\w-]*[A-Za-z0-9])_(?!\w)")  # mypy_ -> mypy
INLINE_LITERAL = re.compile(r"``(.+?)``")
STRONG_EMPH = re.compile(r"\*\*(.+?)\*\*|\*(\S(?:.*?\S)?)\*")
FOOTNOTE_REF = re.compile(r"\s*\[(?:#\w*|\d+|\*)\]_")
BULLET = re.compile(r"^(?:[-*+]|#\.|\d+\.|\(?[a-z0-9]\))\s+")
FIELD = re.compile(r"^:[A-Za-z][\w -]*:(\s|$)")
DIRECTIVE = re.compile(r"^\.\.\s+(?:[\w-]+:)?([\w-]+)::\s*(.*)$")


def _role_text(m):
    role, text = m.group(1), m.group(2)
    titled = TITLED_TARGET.match(text)
    if titled:
        return titled.group(1)
    text = text.lstrip("!")
    if text.startswith("~"):  # Sphinx shows only the last dotted component
        text = text[1:].rsplit(".", 1)[-1]
    # Sphinx renders :func:`len` as "len()"; do the same so the prose reads right.
    if role in ("func", "meth", "py:func", "py:meth") and not text.endswith(")"):
        text += "()"
    return text


def _park_escape(m):
    c = m.group(1)
    return "" if c == " " else chr(0xE000 + ord(c)) if ord(c) < 0x80 else c


def _markup(text):
    """Inline markup outside ``literals``: roles, links, emphasis, escapes."""
    # Escaped characters are parked in the Private Use Area so no markup regex
    # sees them; an escaped space is reST's zero-width separator ("``x``\\ s").
    text = re.sub(r"\\(.)", _park_escape, text)
    text = ROLE.sub(_role_text, text)
    text = HYPERLINK.sub(r"\1", text)
    text = NAMED_REF.sub(r"\1", text)
    text = STRONG_EMPH.sub(lambda m: m.group(1) or m.group(2), text)
    text = FOOTNOTE_REF.sub("", text)
    text = re.sub(r"\|(release|version)\|", "3.11", text)
    return re.sub("[\uE000-\uE07F]", lambda m: chr(ord(m.group()) - 0xE000), text)


def inline(text):
    """Reduce inline reST markup to the text a reader would see."""
    # re.split with a group alternates: even items are markup, odd are literals.
    parts = INLINE_LITERAL.split(text)
    text = "".join(p if k % 2 else _markup(p) for k, p in enumerate(parts))
    return re.sub(r"\s+", " ", text).strip()


def _is_rule(line):
    s = line.strip()
    return len(s) >= 3 and len(set(s)) == 1 and s[0] in RULE_CHARS


def _indent(line):
    return len(line) - len(line.lstrip())


def _skip_indented(lines, i, base):
    """First index at or after i that is non-blank and indented <= base."""
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        i += 1
    return i


def _skip_simple_table(lines, i):
    """Skip a simple table: it ends at a '=== ===' border followed by a blank line."""
    i += 1
    while i < len(lines):
        is_border = set(lines[i].strip()) <= {"=", " "} and lines[i].strip()
        i += 1
        if is_border and (i >= len(lines) or not lines[i].strip()):
            break
    return i


def parse_sections(rst):
    """Split one reST page into [(title, [paragraph, ...])] of plain text."""
    lines = rst.expandtabs(8).splitlines()
    sections = []            # (title, paragraphs); title None before the first heading
    title, paras, para = None, [], []
    item_ind = None  # indent of the list item the current paragraph is, if any

    def flush():
        nonlocal item_ind
        item_ind = None
        if para:
            text = inline(" ".join(para))
            if text:
                paras.append(text)
            para.clear()

    def new_section(heading):
        nonlocal title, paras
        flush()
        sections.append((title, paras))
        title, paras = inline(heading), []

    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        text, ind = line.strip(), _indent(line)
        if not text:
            flush()
            i += 1
        elif _is_rule(line) and nxt.strip() and i + 2 < len(lines) and _is_rule(lines[i + 2]):
            new_section(nxt)  # over- and underlined heading
            i += 3
        elif not ind and _is_rule(nxt) and not _is_rule(line) and len(nxt.strip()) >= len(text):
            new_section(text)  # underlined heading
            i += 2
        elif _is_rule(line):
            i += 1  # transition line
        elif text == ".." or text.startswith(".. "):
            flush()
            m = DIRECTIVE.match(text)
            name, arg = (m.group(1), m.group(2)) if m else (None, "")
            i += 1
            if name in ADMONITIONS or name in VERSION_NOTES:
                if name in VERSION_NOTES:
                    version, _, rest = arg.partition(" ")
                    arg = f"{VERSION_NOTES[name]} {version}:" + (f" {rest}" if rest else "")
                if arg:
                    para.append(arg)  # the body lines continue this paragraph
            elif name in OBJECTS:
                paras.append(inline(arg))  # the signature, then the described body
                while i < len(lines) and lines[i].strip():
                    i += 1  # further signatures and :options: of the same object
            else:
                i = _skip_indented(lines, i, ind)  # comment, label, dropped directive
        elif not para and (re.fullmatch(r"\+[-=+]+\+", text) or text.startswith("| ")):
            flush()  # grid table or line block: dropped
            while i < len(lines) and lines[i].strip():
                i += 1
        elif set(text) <= {"=", " "}:
            flush()
            i = _skip_simple_table(lines, i)
        elif text.startswith(">>>") and not para:
            while i < len(lines) and lines[i].strip():
                i += 1  # doctest block: code, dropped
        else:
            # A bullet starts a paragraph, or a sibling item; mid-paragraph it is
            # just text (a wrapped "+ 12" or "- 1").
            if BULLET.match(text) and (not para or item_ind == ind):
                flush()  # each list item is its own paragraph
                item_ind = ind
                text = BULLET.sub("", text)
            if FIELD.match(text):
                i += 1  # field list (":Author: ...", ":Release: ..."): page metadata
                continue
            para.append(text)
            i += 1
            if text.endswith("::"):
                # "...::" introduces a literal block: keep "...:" (or nothing for
                # a bare "::") and drop the indented code that follows.
                para[-1] = text[:-2].rstrip() + (":" if text[:-2].strip() else "")
                flush()
                i = _skip_indented(lines, i, ind)
    flush()
    sections.append((title, paras))
    return [(t, p) for t, p in sections if t and p]


def first_sentences(text, limit=MAX_TARGET_CHARS):
    """Leading whole sentences of text, shorter than `limit` characters (None if none fit)."""
    out = ""
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        candidate = f"{out} {sentence}".strip()
        if len(candidate) >= limit:
            break
        out = candidate
    return out if out.endswith((".", "!", "?")) and len(out) >= 20 else None


def collect_pages(src):
    pages = []
    for folder, part in PARTS:
        for path in sorted((src / folder).glob("*.rst.txt")):
            if path.name.removesuffix(".rst.txt") not in SKIP_PAGES:
                pages.append((path, part))
    pages += [(src / "library" / f"{name}.rst.txt", "the Python library reference")
              for name in LIBRARY_PAGES]
    return pages


def build_documents(src):
    """[(part, title, content)] in page order, until MAX_PRETRAIN_BYTES."""
    docs, total = [], 0
    for path, part in collect_pages(src):
        for title, paras in parse_sections(path.read_text(encoding="utf-8")):
            content = "\n".join(paras)
            if len(content) < MIN_CONTENT_CHARS:
                continue
            size = len(json.dumps({"title": title, "content": content}, ensure_ascii=False).encode()) + 1
            if total + size > MAX_PRETRAIN_BYTES:
                return docs
            docs.append((part, title, content))
            total += size
    return docs


def build_instructions(docs):
    """One question per distinct section title, answered by its first sentences."""
    pairs, seen = [], set()
    for part, title, content in docs:
        answer = first_sentences(content.split("\n", 1)[0])
        if answer is None or title in seen:
            continue
        seen.add(title)
        # FAQ headings are questions already; other headings become one.
        question = title if title.endswith("?") else \
            f"What does the section '{title}' of {part} explain?"
        pairs.append({"input": f"Question: {question}\nAnswer:", "target": answer})
    return pairs


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=DOCS, help="python3-doc _sources folder")
    ap.add_argument("--out", type=Path, default=OUT, help="output folder")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    docs = build_documents(args.src)
    write_jsonl(args.out / "pretrain.jsonl", [{"title": t, "content": c} for _, t, c in docs])
    pairs = build_instructions(docs)
    write_jsonl(args.out / "instructions.jsonl", pairs)
    lines = [line for _, t, c in docs for line in [t, *c.split("\n")]]
    model = train_sentencepiece(lines, args.out / "spm_bert", VOCAB_SIZE, kind="bert")
    # the instructions too: their "Question:" prompts would otherwise meet a rare "Q" as <unk>
    lines += [line for p in pairs for line in (p["input"] + "\n" + p["target"]).split("\n")]
    llama = train_sentencepiece(lines, args.out / "spm_llama", LLAMA_VOCAB_SIZE, kind="llama", model_type="bpe")
    size = (args.out / "pretrain.jsonl").stat().st_size
    print(f"{len(docs)} documents ({size} bytes), {len(pairs)} instructions, models {model} {llama}")


if __name__ == "__main__":
    main()
