"""The offline corpus and the embedded default task, both made from Python's own documentation.

No model hub or data set can be reached on an offline machine, but every Python installation carries real
English text about a real subject: the reference topics in `pydoc_data.topics` and the docstrings of the
standard library. This module turns them into

* *units*: one per documented module, class, function or topic, each with a stable key;
* a fixed split of the units into train / validation / test by a hash of their answer text, so the same
  unit always lands in the same split and units that share an answer share a split;
* the pre-training corpus of the offline base model (train units only: validation and test texts are kept
  out of pre-training, so the base model has not memorised the answers it is evaluated on);
* the instruction task `builtin:stdlib-docs-qa`: a question about a unit, answered with the first paragraph
  of its documentation.

Docstrings are read with `ast` from the library's source files rather than by importing modules, so
collecting them has no side effects and gives the same result in every process. Nothing in `datasets` or
elsewhere offers this corpus, hence our own code.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "validation", "test")
# Share of units (by key hash) in validation and test; the rest trains.
_HELD_OUT = {"validation": 0.05, "test": 0.05}
# Packages whose docstrings are tests, tools or GUI code rather than library documentation.
_SKIP_MODULES = {
    "test",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
    "this",
    "antigravity",
    "__phello__",
    "_pydev_bundle",
    "turtle",
}
_MAX_ANSWER_CHARS = 320
_MIN_ANSWER_CHARS = 24


@dataclass(frozen=True)
class DocUnit:
    """One documented thing: `key` is its dotted name (or 'topic:NAME'), `title` how a question names it."""

    key: str
    kind: str  # "module", "class", "function", "method" or "topic"
    title: str
    text: str

    @property
    def answer(self) -> str:
        return first_paragraph(self.text)

    @property
    def split(self) -> str:
        # By the answer, not the name: many docstrings are shared (overrides, aliases), and a shared
        # answer must not be in training and test at once.
        return split_of(self.answer or self.key)


def split_of(key: str) -> str:
    """The fixed split of a text: its hash mapped onto [0, 1)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < _HELD_OUT["test"]:
        return "test"
    if position < _HELD_OUT["test"] + _HELD_OUT["validation"]:
        return "validation"
    return "train"


@lru_cache(maxsize=1)
def collect_units() -> tuple[DocUnit, ...]:
    """Every documented unit of this Python's standard library and reference topics, in a stable order."""
    units = list(_topic_units())
    for module_name, path in _stdlib_sources():
        units.extend(_units_of_source(module_name, path))
    seen: set[str] = set()
    unique = []
    for unit in units:
        if unit.key not in seen:
            seen.add(unit.key)
            unique.append(unit)
    return tuple(unique)


def _topic_units() -> Iterator[DocUnit]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        lines = text.splitlines()
        # Topics open with a title underlined by '*' characters.
        if len(lines) > 1 and set(lines[1].strip()) == {"*"}:
            title, text = lines[0].strip(), "\n".join(lines[2:]).strip()
        else:
            title = name
        yield DocUnit(key=f"topic:{name}", kind="topic", title=title, text=text)


def _stdlib_sources() -> Iterator[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(sys.stdlib_module_names):
        if name in _SKIP_MODULES or name.startswith("_"):
            continue
        package = root / name
        if (package / "__init__.py").is_file():
            for path in sorted(package.rglob("*.py")):
                parts = path.relative_to(root).with_suffix("").parts
                if any(
                    p in {"test", "tests", "idle_test"} or (p.startswith("_") and p != "__init__")
                    for p in parts
                ):
                    continue
                yield ".".join(p for p in parts if p != "__init__"), path
        elif (root / f"{name}.py").is_file():
            yield name, root / f"{name}.py"


def _units_of_source(module_name: str, path: Path) -> Iterator[DocUnit]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return
    doc = ast.get_docstring(tree)
    if doc:
        yield DocUnit(key=module_name, kind="module", title=f"the {module_name} module", text=doc)
    yield from _units_of_body(tree.body, module_name, in_class=False)


def _units_of_body(body: list[ast.stmt], prefix: str, in_class: bool) -> Iterator[DocUnit]:
    for node in body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        if node.name.startswith("_"):
            continue
        qualname = f"{prefix}.{node.name}"
        doc = ast.get_docstring(node)
        if isinstance(node, ast.ClassDef):
            if doc:
                yield DocUnit(key=qualname, kind="class", title=f"{qualname} class", text=doc)
            yield from _units_of_body(node.body, qualname, in_class=True)
        elif doc:
            kind = "method" if in_class else "function"
            yield DocUnit(key=qualname, kind=kind, title=f"{qualname}({_signature(node.args)})", text=doc)


def _signature(args: ast.arguments) -> str:
    names = [a.arg for a in args.posonlyargs + args.args if a.arg not in {"self", "cls"}]
    if args.vararg:
        names.append(f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        names.append("*")
    names.extend(a.arg for a in args.kwonlyargs)
    if args.kwarg:
        names.append(f"**{args.kwarg.arg}")
    return ", ".join(names)


# ---------------------------------------------------------------------------------------------------------
# The pre-training corpus and the question/answer task


def pretraining_texts(units: tuple[DocUnit, ...] | None = None) -> list[str]:
    """Documents for pre-training the offline base: train-split units only, each headed by its name."""
    units = collect_units() if units is None else units
    return [f"{u.title}\n\n{u.text}" for u in units if u.split == "train"]


def first_paragraph(text: str) -> str:
    """The first prose paragraph of a docstring or topic, whitespace folded, cut at a sentence end."""
    for block in re.split(r"\n\s*\n", text.strip()):
        block = " ".join(block.split())
        # Skip signature lines ('dumps(obj) -> str'), grammar rules and code.
        if (
            not block
            or "::=" in block
            or block.startswith((">>>", "$ "))
            or not re.search(r"[a-z]{3}", block)
        ):
            continue
        if re.fullmatch(r"[\w.]+\(.*\)( -> .*)?", block):
            continue
        return _cut_at_sentence(block, _MAX_ANSWER_CHARS)
    return ""


def _cut_at_sentence(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[: end + 1] if end > _MIN_ANSWER_CHARS else cut.rsplit(" ", 1)[0] + " ..."


_QUESTIONS = {
    "module": ("What is {title} for?", "Describe {title}."),
    "class": ("What is the {title} for?", "Describe the {title}."),
    "function": ("What does {title} do?", "Explain the function {title}."),
    "method": ("What does the method {title} do?", "Explain {title}."),
    "topic": ("Explain {title} in Python.", "What does the Python reference say about {title}?"),
}


def qa_examples(split: str, units: tuple[DocUnit, ...] | None = None) -> list[dict]:
    """The `builtin:stdlib-docs-qa` examples of one split, as chat records with a `source` key."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    units = collect_units() if units is None else units
    records = []
    for unit in units:
        if unit.split != split:
            continue
        answer = unit.answer
        if len(answer) < _MIN_ANSWER_CHARS:
            continue
        templates = _QUESTIONS[unit.kind]
        # The template is chosen by the key's hash, so it is fixed per unit across runs.
        question = templates[int(hashlib.md5(unit.key.encode()).hexdigest(), 16) % len(templates)]
        records.append(
            {
                "messages": [
                    {"role": "user", "content": question.format(title=unit.title)},
                    {"role": "assistant", "content": answer},
                ],
                "source": unit.key,
            }
        )
    return records
