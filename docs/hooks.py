"""MkDocs hook: generates ``presets.md`` (from the preset JSON Schema) and ``families.md`` (from the family
registry) at build time, so the reference pages cannot drift from the code."""

from __future__ import annotations

import json
from typing import Any

from mkdocs.structure.files import File, Files

SECTION_TITLES = {"Dataset": "dataset", "FeatureSpec": "features", "Scheduler": "scheduler", "Resources": "resources",
                  "HeldoutConfig": "heldout", "SearchSettings": "search", "FamilyEntry": "families.&lt;entry&gt;"}


def _type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[-1]
        return f"[{SECTION_TITLES.get(name, name)}](#{SECTION_TITLES.get(name, name).split('.')[0]})"
    if "anyOf" in prop and len(prop["anyOf"]) > 4:
        return "a value or a distribution"
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"])
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    kind = prop.get("type", "any")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    if kind == "array":
        return f"list of {_type(prop.get('items', {}))}"
    if kind == "object" and "additionalProperties" in prop and isinstance(prop["additionalProperties"], dict):
        return f"mapping to {_type(prop['additionalProperties'])}"
    bounds = [f"{sym} {prop[key]}" for key, sym in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"),
                                                     ("exclusiveMaximum", "<")) if key in prop]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _text(doc: str) -> str:
    """A docstring's reST literals as Markdown code."""
    return " ".join(doc.replace("``", "`").split())


def _table(model: dict[str, Any]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    required = set(model.get("required", []))
    for name, prop in model.get("properties", {}).items():
        default = "required" if name in required else (f"`{json.dumps(prop['default'])}`" if "default" in prop else "")
        rows.append(f"| `{name}` | {_type(prop)} | {default} | {_text(prop.get('description', ''))} |")
    return rows


def presets_page() -> str:
    from raysd.paths import SEARCH_SPACES
    from raysd.preset_schema import schema

    s = schema()
    shipped = ", ".join(f"`{p.stem}`" for p in sorted(SEARCH_SPACES.glob("*.yaml")))
    out = ["# Presets", "",
           "A preset is a YAML file: `search_spaces/<name>.yaml` (pass its name) or any path. This page is generated",
           "from the typed model that checks it (`raysd/preset_schema.py`); `python -m raysd.presets --schema` prints",
           "the same JSON Schema, and `search_spaces/preset.schema.json` lets an editor complete and check a preset.",
           "", f"Shipped presets: {shipped}.", "", "## Top level", "", s.get("description", ""), "", *_table(s), ""]
    for name, title in SECTION_TITLES.items():
        model = s["$defs"][name]
        out += [f"## {title.split('.')[0]}" if name != "FamilyEntry" else "## families", "",
                _text(model.get("description", "")), "", *_table(model), ""]
    out += ["The values a `space:` may give each hyperparameter are on the [Families](families.md) page: a fixed value,",
            "or a distribution `{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}`, `{randint: [lo, hi]}` or",
            "`{choice: [...]}`.", ""]
    return "\n".join(out)


def families_page() -> str:
    from raysd.families import REGISTRY
    from raysd.families.__main__ import describe, describe_config, format_view
    from raysd.families.base import import_family_modules
    from raysd.families.hparams import TrainHP

    import_family_modules()

    def rows(fields: list[dict[str, Any]]) -> list[str]:
        out = ["| hyperparameter | type | default | description |", "|---|---|---|---|"]
        out += [f"| `{r['name']}` | {r['type'].replace('|', ' &#124; ')} | `{json.dumps(r['default'])}` | "
                f"{r['description']} |" for r in fields]
        return out

    out = ["# Families", "",
           "Generated from the family registry (`python -m raysd.families` prints the same). Every key below may",
           "appear in a preset entry's `space:`, fixed or as a distribution.", "",
           "## Common training hyperparameters", "", *rows(describe_config(TrainHP)), ""]
    for name in sorted(REGISTRY):
        fam = describe(name)
        out += [f"## {name}", "", fam["description"], "", f"Trains on {format_view(fam['view'])}.", "",
                *rows(fam["hyperparameters"]), ""]
    return "\n".join(out)


def on_files(files: Files, config: Any) -> Files:
    for name, text in (("presets.md", presets_page()), ("families.md", families_page())):
        files.append(File.generated(config, name, content=text))
    return files
