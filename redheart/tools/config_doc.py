"""Write the configuration reference (docs/config.md) from the redheart.config package itself.

    python -m redheart.tools.config_doc > docs/config.md

Each field's docstring in the dataclasses is the documentation, so the reference cannot drift:
a test regenerates it and compares.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys

from redheart.config import _CHOICES, SECTIONS, _toml_value


def field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the section dataclasses of `redheart/config/` by `python -m redheart.tools.config_doc`; a test keeps it current.",
        "",
        "One TOML file, one `[section]` per component. Precedence, highest first: command line",
        "(`--set section.key=value`, `--output-dir`) > environment (`REDHEART_SECTION__KEY=value`, e.g.",
        "`REDHEART_TRAIN__BATCH_SIZE=16`) > the file > the defaults below. Unknown keys, wrong types and",
        "impossible combinations are refused with the file, line, values and a fix. Each service reads the",
        "whole file but uses only `[model]`, its own section, `[wire]` and `[metrics]`; the orchestrator sends",
        "the `[train]` and `[regret]` settings to the stages when a run starts.",
        "",
        "The original prototype's `HybridConfig(...)` keywords (`target_params`, `gpu_memory_gb`,",
        "`cpu_memory_gb`, `regrets_per_step`, `epochs`, `batch_size`, `num_workers`,",
        "`use_mixed_precision`, ...) are fields below with the same names, accepted flat by",
        "`HybridConfig(**kwargs)` when the name is unique across sections.",
        "",
    ]
    for section, cls in SECTIONS.items():
        lines += [f"## `[{section}]`", "", "| key | default | description |", "|---|---|---|"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = "(unset)" if default is None else _toml_value(default)
            doc = docs.get(f.name, "")
            choices = _CHOICES.get((section, f.name))
            if choices:
                doc += f" One of: {', '.join(choices)}."
            lines.append(f"| `{f.name}` | `{shown}` | {doc} |")
        lines.append("")
    return "\n".join(line for line in lines) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
