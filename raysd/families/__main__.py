"""``python -m raysd.families [--json] [NAME ...]``: list the registered model families, the feature view
each trains on, and the typed hyperparameters (with defaults) a search preset may set."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any

from raysd.families import REGISTRY, get_family
from raysd.families.base import import_family_modules
from raysd.families.hparams import TrainHP
from raysd.typed import field_description


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin in (tuple, list):
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def describe_config(config_cls: type) -> list[dict[str, Any]]:
    hints = typing.get_type_hints(config_cls)
    rows = []
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        if isinstance(default, tuple):
            default = list(default)
        rows.append({"name": f.name, "type": type_name(hints[f.name]), "default": default,
                     "description": field_description(config_cls, f.name)})
    return rows


def describe(name: str) -> dict[str, Any]:
    cls = get_family(name)
    view = cls().view()
    return {
        "name": name,
        "description": cls.description,
        "view": {"frames": view.frames, "hop": view.hop, "layout": view.layout,
                 **({"extras": [e.to_dict() for e in view.extras]} if view.extras else {})},
        "hyperparameters": describe_config(cls.Config),
    }


def format_view(v: dict[str, Any]) -> str:
    size = "whole clip" if v["frames"] == 0 else f"{v['frames']} frames, hop {v['hop']}"
    kind = "frame vectors (frames x mels, flattened)" if v["layout"] == "vector" else "images (1 x mels x frames)"
    extras = "".join(f"; with the {e['kind']} of the whole clip" for e in v.get("extras", []))
    return f"{kind}; {size}{extras}"


def format_rows(rows: list[dict[str, Any]], indent: str = "    ") -> list[str]:
    if not rows:
        return [indent + "(none)"]
    w_name = max(len(r["name"]) for r in rows)
    w_type = max(len(r["type"]) for r in rows)
    w_default = max(len(json.dumps(r["default"])) for r in rows)
    return [f"{indent}{r['name']:<{w_name}}  {r['type']:<{w_type}}  = {json.dumps(r['default']):<{w_default}}  "
            f"{r['description']}".rstrip() for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysd.families", description=__doc__)
    parser.add_argument("names", nargs="*", help="families to show (default: all registered)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    try:
        import_family_modules()
        families = [describe(n) for n in (args.names or sorted(REGISTRY))]
    except (KeyError, ImportError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    common = describe_config(TrainHP)
    if args.json:
        print(json.dumps({"common": common, "families": families}, indent=2))
        return 0
    lines = ["Common training hyperparameters (every family):", *format_rows(common), ""]
    for fam in families:
        lines += [f"{fam['name']}: {fam['description']}", f"  view: {format_view(fam['view'])}",
                  "  hyperparameters:", *format_rows(fam["hyperparameters"]), ""]
    print("\n".join(lines).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
