"""The recipe reference, `recipes/REFERENCE.md`, made from trainer/recipe.py's own definitions: every key with its
type, default, allowed values and meaning (the comments beside and above it in the schema), so it cannot say other
than what the loader does. tests/test_recipe.py fails when the file and the definitions differ.

    python -m trainer.reference > recipes/REFERENCE.md
"""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
import typing
from pathlib import Path

from trainer import recipe

# Each table of a recipe, in the order a recipe file has them: (how TOML names it, the schema's class).
TABLES: tuple[tuple[str, type], ...] = (
    ("top level", recipe.Recipe),
    ("[[stages]]", recipe.Stage),
    ("[model]", recipe.Model),
    ("[text]", recipe.Text),
    ("[data]", recipe.Data),
    ("[[data.mixture]]", recipe.Mix),
    ("[optimizer]", recipe.Optimizer),
    ("[loss]", recipe.Loss),
    ("[mesh]", recipe.Mesh),
    ("[checkpoint]", recipe.Checkpoint),
    ("[log]", recipe.Log),
    ("[[evals]]", recipe.Eval),
)
NESTED = {"stages", "model", "text", "data", "optimizer", "loss", "mesh", "checkpoint", "log", "evals", "mixture"}


def comments(source: str) -> tuple[dict[int, str], set[int]]:
    """Each line's trailing comment (line number -> text), and the lines that hold a comment alone."""
    trailing: dict[int, str] = {}
    alone: set[int] = set()
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            trailing[line] = tok.string.lstrip("#").strip()
            if line not in code_lines:
                alone.add(line)
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING):
            code_lines.add(tok.start[0])
    return trailing, alone


def meanings(cls: type) -> dict[str, str]:
    """Field name -> the comment lines right above its definition, then the one beside it."""
    path = Path(recipe.__file__)
    source = path.read_text()
    text, alone = comments(source)
    body = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    found = {}
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line, above = node.lineno, list[str]()
            while line - 1 in alone:
                line -= 1
                above.insert(0, text[line])
            beside = "" if node.lineno in alone else text.get(node.lineno, "")
            found[node.target.id] = " — ".join(p for p in (" ".join(above), beside) if p)
    return found


def type_of(hint: object) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(f'`"{v}"`' for v in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "array of tables"
    names: dict[object, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(hint, str(hint))


def default_of(f: dataclasses.Field[typing.Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(table)"
    else:
        return "required"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[]`" if not value else f"`{list(value)}`"
    if isinstance(value, float):
        return f"`{value:.6g}`"
    return f"`{value}`"


def markdown() -> str:
    lines = [
        "# Recipe reference",
        "",
        "Every key a recipe may set, made from `trainer/recipe.py` (`python -m trainer.reference >"
        " recipes/REFERENCE.md`; a test fails when they differ). Any key can be overridden for one run:"
        " `--set stages.0.global_batch=256`, `--set model.remat=block`. An unknown key, a wrong type or an impossible"
        " value is one line naming the key.",
    ]
    for title, cls in TABLES:
        meaning, hints = meanings(cls), typing.get_type_hints(cls, vars(recipe))
        rows = [
            f"| `{f.name}` | {type_of(hints[f.name])} | {default_of(f)} | {meaning.get(f.name, '').replace('|', '/')} |"
            for f in dataclasses.fields(cls)
            if not (cls is recipe.Recipe and f.name in NESTED) and not (cls is recipe.Data and f.name == "mixture")
        ]
        lines += ["", f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|", *rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
