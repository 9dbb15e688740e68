"""Describes the dataclasses of the installed trustgraph-base as JSON for `cargo xtask schema`.

Run with the test venv's Python; prints one JSON document on stdout: the package version and, per
module of `trustgraph.schema`, its dataclasses with their fields (name, type, default, comment).
The Rust side (xtask/src/schema.rs) turns it into code; keeping the Python side to plain
introspection means the generated code depends only on what the framework declares.
"""

import dataclasses
import importlib
import importlib.metadata
import inspect
import json
import pkgutil
import re
import sys
import types
import typing

import trustgraph.schema as schema
from trustgraph.base.serialization import dataclass_to_dict


def type_tree(t):
    """A JSON description of a resolved type hint."""
    if t is str:
        return {"kind": "str"}
    if t is bool:
        return {"kind": "bool"}
    if t is int:
        return {"kind": "int"}
    if t is float:
        return {"kind": "float"}
    if t is bytes:
        return {"kind": "bytes"}
    if t is typing.Any or t is object:
        return {"kind": "any"}
    if dataclasses.is_dataclass(t):
        return {"kind": "class", "name": t.__name__, "module": t.__module__}
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin in (types.UnionType, typing.Union):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return {"kind": "optional", "of": type_tree(rest[0])}
        return {"kind": "any", "note": repr(t)}
    if origin is list or t is list:
        return {"kind": "list", "of": type_tree(args[0]) if args else {"kind": "any"}}
    if origin is dict or t is dict:
        if args and args[0] is not str:
            raise SystemExit(f"dict key type {args[0]!r} is not str")
        return {"kind": "dict", "of": type_tree(args[1]) if args else {"kind": "any"}}
    raise SystemExit(f"unsupported type {t!r}")


FIELD_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:")


def field_comments(cls):
    """Comments of each field: `# …` lines right above it and a trailing `# …` on its line."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments = {}
    pending = []
    for line in source.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = FIELD_LINE.match(line)
        if m and not stripped.startswith(("def ", "@")):
            text = list(pending)
            if "#" in line:
                # a trailing comment, outside any string literal of the default
                code, _, trailing = line.partition("  #")
                if trailing:
                    text.append(trailing.lstrip("#").strip())
            comments[m.group(1)] = [t for t in text if t]
        pending = []
    return comments


def default_of(field):
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return {"required": True}
    if dataclasses.is_dataclass(value):
        return {"value": dataclass_to_dict(value), "class": type(value).__name__}
    return {"value": dataclass_to_dict(value) if isinstance(value, (list, dict, bytes)) else value}


def modules():
    seen = set()
    for info in pkgutil.walk_packages(schema.__path__, schema.__name__ + "."):
        module = importlib.import_module(info.name)
        classes = []
        for name, cls in vars(module).items():
            if (
                inspect.isclass(cls)
                and dataclasses.is_dataclass(cls)
                and cls.__module__ == module.__name__
                and cls not in seen
            ):
                seen.add(cls)
                # a forward reference may name a class of another schema module (`"Triples"`), which
                # the defining module does not import: resolve it in the package namespace
                hints = typing.get_type_hints(cls, localns=vars(schema))
                comments = field_comments(cls)
                fields = []
                for f in dataclasses.fields(cls):
                    fields.append(
                        {
                            "name": f.name,
                            "type": type_tree(hints[f.name]),
                            "default": default_of(f),
                            "comment": comments.get(f.name, []),
                        }
                    )
                doc = inspect.getdoc(cls) or ""
                # dataclass() invents a signature docstring when there is none
                if doc.startswith(cls.__name__ + "("):
                    doc = ""
                classes.append({"name": name, "doc": doc, "fields": fields})
        if classes:
            classes.sort(key=lambda c: inspect.getsourcelines(getattr(module, c["name"]))[1])
            yield {"module": module.__name__, "doc": inspect.getdoc(module) or "", "classes": classes}


json.dump(
    {
        "package": "trustgraph-base",
        "version": importlib.metadata.version("trustgraph-base"),
        "python": sys.version.split()[0],
        "modules": list(modules()),
    },
    sys.stdout,
    indent=1,
    sort_keys=False,
)
