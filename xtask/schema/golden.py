"""Golden vectors for the generated Rust types, made by the framework itself.

    golden.py emit            one JSON line per dataclass of trustgraph.schema:
                              {"name", "populated", "empty"}, each the framework's JSON
                              (dataclass_to_dict + json.dumps, as its backends send it)
    golden.py verify FILE     FILE has lines {"name", "populated", "empty"} written by the Rust
                              types; each is decoded with the framework's dict_to_dataclass and
                              compared with the instance `emit` made; prints the mismatches and
                              exits non-zero if there are any

The populated instance sets every field to a value that differs from its default (nested
dataclasses populated too, two levels deep), so a field the Rust side drops or renames shows.
"""

import dataclasses
import importlib
import inspect
import json
import pkgutil
import sys
import types
import typing

import trustgraph.schema as schema
from trustgraph.base.serialization import dataclass_to_dict, dict_to_dataclass

DEPTH = 2


def classes():
    seen = set()
    for info in pkgutil.walk_packages(schema.__path__, schema.__name__ + "."):
        module = importlib.import_module(info.name)
        for name, cls in vars(module).items():
            if (
                inspect.isclass(cls)
                and dataclasses.is_dataclass(cls)
                and cls.__module__ == module.__name__
                and cls not in seen
            ):
                seen.add(cls)
                yield f"{module.__name__}.{name}", cls


def value_for(t, name, depth, default):
    if t is str:
        return f"{name}-text é"
    if t is bool:
        return not default if isinstance(default, bool) else True
    if t is int:
        return 42 if default != 42 else 43
    if t is float:
        return 0.25
    if t is bytes:
        return f"{name}-bytes".encode()
    if t is typing.Any or t is object:
        return {"any": [1, "two", None, True]}
    if dataclasses.is_dataclass(t):
        return populated(t, depth + 1)
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin in (types.UnionType, typing.Union):
        inner = next(a for a in args if a is not type(None))
        if dataclasses.is_dataclass(inner) and depth >= DEPTH:
            return None
        return value_for(inner, name, depth, None)
    if origin is list or t is list:
        item = args[0] if args else typing.Any
        if dataclasses.is_dataclass(item) and depth >= DEPTH:
            return []
        return [value_for(item, name, depth, None)]
    if origin is dict or t is dict:
        item = args[1] if args else typing.Any
        if dataclasses.is_dataclass(item) and depth >= DEPTH:
            return {}
        return {"key": value_for(item, name, depth, None)}
    raise SystemExit(f"no value for {t!r}")


def populated(cls, depth=0):
    hints = typing.get_type_hints(cls, localns=vars(schema))
    kwargs = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs[f.name] = value_for(hints[f.name], f.name, depth, default)
    return cls(**kwargs)


def instances():
    for name, cls in classes():
        yield name, cls, populated(cls), cls()


def emit():
    for name, _cls, full, empty in instances():
        print(
            json.dumps(
                {
                    "name": name,
                    "populated": json.dumps(dataclass_to_dict(full)),
                    "empty": json.dumps(dataclass_to_dict(empty)),
                }
            )
        )


def without_none(value):
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


def verify(path):
    expected = {name: (cls, full, empty) for name, cls, full, empty in instances()}
    problems = []
    checked = 0
    with open(path) as f:
        for line in f:
            entry = json.loads(line)
            cls, full, empty = expected[entry["name"]]
            for which, original in (("populated", full), ("empty", empty)):
                decoded = dict_to_dataclass(json.loads(entry[which]), cls)
                # Where the framework's dict_to_dataclass cannot resolve a type hint (a forward
                # reference to another module's class, `"Triples"`) or meets a dataclass inside a
                # list of lists, it keeps the plain dict, in which a key we left out for `None`
                # stays missing. Compare what each side puts on the wire, `None` and missing alike.
                if without_none(dataclass_to_dict(decoded)) != without_none(dataclass_to_dict(original)):
                    problems.append(
                        f"{entry['name']} ({which}): Rust wrote {entry[which]}, "
                        f"which the framework reads as {decoded!r}, not {original!r}"
                    )
                checked += 1
    missing = set(expected) - {json.loads(l)["name"] for l in open(path)}
    for name in sorted(missing):
        problems.append(f"{name}: the Rust side wrote nothing")
    for p in problems:
        print(p)
    print(f"verified {checked} vectors of {len(expected)} types, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    if sys.argv[1:] == ["emit"]:
        emit()
    elif len(sys.argv) == 3 and sys.argv[1] == "verify":
        verify(sys.argv[2])
    else:
        raise SystemExit(__doc__)
