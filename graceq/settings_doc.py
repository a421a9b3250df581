"""The README's table of every setting, generated from the pydantic models of graceq.config.

The README holds the table between two marker lines; ``graceq settings`` prints it and
``python -m graceq.settings_doc README.md`` rewrites the README's copy. A test compares the two, so
that a setting added to (or changed in) ``graceq.config`` cannot go undocumented: the table lists
every field of every section with its type, its default and its ``Field(description=...)``, and the
keys each reference engine accepts in ``[engine]``.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

BEGIN = "<!-- settings: generated from graceq/config.py by `graceq settings`; do not edit by hand -->"
END = "<!-- end of settings -->"
NO_DESCRIPTION = "(no description yet)"


def _type_name(annotation) -> str:
    """'int', 'float or none', '"error" or "skip"', 'list of float' for a field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " or ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "table"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is None:
        return "-"
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.0e}"
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return ", ".join(f"{v:g}" for v in value)
    return f'"{value}"' if isinstance(value, str) else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sections(root: type[BaseModel]):
    for name, field in root.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield name, annotation


def _engine_keys() -> list[str]:
    """One line per reference engine of graceq's own: the [engine] keys it accepts."""
    from graceq.engines import ENGINES, engine_class

    lines = []
    for name in ENGINES:
        try:
            cls = engine_class(name)
        except ValueError:
            continue
        if not cls.__module__.startswith("graceq."):  # graceq's own engines: the README documents those
            continue
        keys = sorted(getattr(cls, "SETTINGS", ()) or ())
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        where = cls.__module__.replace(".", "/") + ".py"
        listed = ", ".join(f"`{k}`" for k in keys) if keys else f"see `{where}`"
        lines.append(f"- `engine = \"{name}\"`: {doc} Keys: {listed}.")
    return lines


def settings_markdown(root: type[BaseModel] | None = None, engines: bool = True) -> str:
    """The markdown tables of every section and field of the settings model `root` (default Settings)."""
    if root is None:
        from graceq.config import Settings as root
    out = []
    for section, model in _sections(root):
        out += [f"**[{section}]**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, field in model.model_fields.items():
            out.append(f"| `{key}` | {_cell(_type_name(field.annotation))} | {_cell(_default(field))} | "
                       f"{_cell(field.description or NO_DESCRIPTION)} |")
        if section == "engine" and engines:
            out += ["", "Each engine's own keys go into `[engine]` as well:", ""] + _engine_keys()
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def readme_block(text: str) -> str:
    """The part of a README between the markers (without them); ValueError if the markers are missing."""
    try:
        start = text.index(BEGIN) + len(BEGIN)
        end = text.index(END, start)
    except ValueError:
        raise ValueError(f"the README has no settings block: put {BEGIN!r} and {END!r} on lines of their own") from None
    return text[start:end].strip("\n") + "\n"


def update_readme(path: str | Path) -> bool:
    """Rewrite the README's settings block from the models; True when it changed."""
    path = Path(path)
    text = path.read_text()
    old = readme_block(text)
    new = settings_markdown()
    if old == new:
        return False
    start = text.index(BEGIN) + len(BEGIN)
    end = text.index(END, start)
    path.write_text(text[:start] + "\n" + new + text[end:])
    return True


if __name__ == "__main__":  # python -m graceq.settings_doc README.md
    target = sys.argv[1] if len(sys.argv) > 1 else "README.md"
    print(f"{target}: {'updated' if update_readme(target) else 'already up to date'}")
