"""The shipped YAML recipes (package data beside this file) and the `recipe:NAME` form that names them.

Owns: finding the recipes with `importlib.resources` (so they work from an installed wheel, not only from a
clone), their one-line descriptions (the first sentence of each recipe's leading comment), reading a recipe's
text, and copying one out for editing. `config.read_yaml` (every `--config`, `muonft sweep RECIPE`) resolves
`recipe:NAME` here. Torch-free; never prints.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from muonft_cli._common import atomic_write_text
from muonft_cli.errors import UserInputError

PREFIX = "recipe:"
SUFFIX = ".yaml"

__all__ = ["PREFIX", "is_recipe_ref", "names", "name_of", "read_text", "describe", "list_recipes", "copy"]


def _folder():
    return resources.files(__name__)


def names() -> list[str]:
    """The shipped recipes' names (file names without `.yaml`), sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in _folder().iterdir() if p.name.endswith(SUFFIX) and p.is_file())


def is_recipe_ref(spec: object) -> bool:
    """True for a `recipe:NAME` string."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def name_of(spec: str) -> str:
    """The shipped recipe named by `spec` (`NAME`, `NAME.yaml`, `recipe:NAME` or `recipe:NAME.yaml`).

    Raises `UserInputError` (exit 2) for an unknown name, suggesting the closest ones and listing them all.
    """
    name = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    name = name.strip()
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    known = names()
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UserInputError(f"unknown recipe '{name}': {hint}known recipes: {', '.join(known)}")


def read_text(spec: str) -> str:
    """The YAML text of the shipped recipe `spec` names (see `name_of`)."""
    return _folder().joinpath(name_of(spec) + SUFFIX).read_text(encoding="utf-8")


def _summary(text: str) -> str:
    """`text` up to its first sentence end or ': ' outside brackets (an ellipsis '...' ends nothing)."""
    depth = 0
    for i, ch in enumerate(text):
        nxt = text[i + 1] if i + 1 < len(text) else " "
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0 and nxt == " " and (ch == ":" or (ch == "." and text[i - 1:i] != ".")):
            return text[:i]
    return text.rstrip(".")


def describe(text: str) -> str:
    """One line about a recipe: its leading comment (up to an indented or quoted command line, or the first
    line that is not a comment) up to the end of its first sentence or its first top-level ': '."""
    words: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.startswith(("  ", "\t", " `")) or not body.strip():
            break
        words.append(body.strip())
    return _summary(" ".join(words))


def list_recipes() -> list[dict[str, str]]:
    """`{"name", "description"}` of every shipped recipe, sorted by name."""
    return [{"name": n, "description": describe(read_text(n))} for n in names()]


def copy(spec: str, dest: str | Path | None = None, *, force: bool = False) -> Path:
    """Write the shipped recipe `spec` to `dest` (default `./NAME.yaml`; a folder gets `NAME.yaml` inside).

    Refuses (UserInputError, exit 2) to overwrite an existing file unless `force`. Returns the path written.
    """
    name = name_of(spec)
    text = read_text(name)
    out = Path(dest).expanduser() if dest is not None else Path(name + SUFFIX)
    if out.is_dir():
        out = out / (name + SUFFIX)
    if out.exists() and not force:
        raise UserInputError(f"'{out}' already exists: pass --force to overwrite it, or give another destination")
    if not out.parent.is_dir():
        raise UserInputError(f"folder '{out.parent}' does not exist: create it first or give another destination")
    return atomic_write_text(out, text)
