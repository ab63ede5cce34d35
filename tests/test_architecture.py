"""The layer rule of ARCHITECTURE.md, checked on the code: a module imports only from layers below its own.

Every import of a package module is read from the source (``ast``; imports inside functions count too).
An import into the same layer or a higher one fails unless it is listed in ``ALLOWED`` with its reason;
a module that is in no layer fails too, so a new module is placed on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rebasin_callbacks"

#: layer -> modules (dotted, relative to the package). Keep in step with ARCHITECTURE.md's table.
LAYERS: dict[int, tuple[str, ...]] = {
    0: (
        "io",
        "data",
        "settings",
        "sinkhorn",
        "trace_rules",
        "trace_spaces",
        "seeds",
        "devices",
        "modes",
        "threads",
        "rng",
        "rasterise",
    ),
    1: ("spec", "plotting", "batches"),
    2: ("states", "checkpoints"),
    3: ("utils",),
    4: ("permute",),
    5: ("verify", "bn"),
    6: ("trace", "lmc"),
    7: ("spec_source",),
    8: ("matching", "rebasin"),
    9: ("costs",),
    10: ("refine",),
    11: ("align", "incremental", "merge_matching", "merge"),
    12: ("lightning_guards", "lightning_spec", "commands.errors"),
    13: (
        "lightning_weights",
        "lightning_sharing",
        "commands.paths",
        "commands.datasets",
        "commands.devices",
        "commands.specs",
    ),
    14: ("commands.arguments",),
    15: ("commands.architectures",),
    16: ("commands.loading", "commands.shapes"),
    17: ("commands.common",),
    18: (
        "lightning",
        "lightning_fusion",
        "lightning_merge",
        "avalanche",
        "commands.__init__",
        "commands.align",
        "commands.merge",
        "commands.lmc",
        "commands.spec",
        "cli",
        "demo",
    ),
    19: ("__init__", "__main__"),
}

#: (importer, imported) -> why an import into the same layer is right. Never an upward import.
ALLOWED: dict[tuple[str, str], str] = {
    (
        "lightning",
        "lightning_fusion",
    ): "ReBasinFusion is re-exported where the Lightning callbacks are imported",
    ("demo", "lightning"): "the demo is a Lightning run: it drives the callbacks it shows",
    ("merge", "align"): "two models with equal weights: the merge objective is align's, so merge calls it",
    (
        "merge",
        "merge_matching",
    ): "merge's algorithms (star, MergeMany, the joint refinement), a module of their own",
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports (``from rebasin_callbacks import f`` of an export is the package
    face, ``__init__``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path.name}: relative import (write rebasin_callbacks.{node.module})")
        if isinstance(node, ast.ImportFrom) and node.module == "rebasin_callbacks":
            # a submodule by name, else an export of the package face
            found.update(a.name if (PACKAGE / f"{a.name}.py").exists() else "__init__" for a in node.names)
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rebasin_callbacks.")
        ):
            found.add(node.module.partition(".")[2])
        elif isinstance(node, ast.Import):
            found.update(
                a.name.partition(".")[2] for a in node.names if a.name.startswith("rebasin_callbacks.")
            )
    return found


def _layer_of() -> dict[str, int]:
    return {module: layer for layer, modules in LAYERS.items() for module in modules}


def test_every_module_has_a_layer() -> None:
    layer_of = _layer_of()
    unplaced = sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if _module_name(p) not in layer_of)
    assert not unplaced, f"modules in no layer: {unplaced}: add each to LAYERS here and to ARCHITECTURE.md"
    missing = sorted(m for m in layer_of if not (PACKAGE / (m.replace(".", "/") + ".py")).exists())
    assert not missing, f"LAYERS names modules that do not exist: {missing}"


def _violations(imports: dict[str, set[str]]) -> list[str]:
    """Each import (importer -> its imported modules) into the same layer or a higher one not in ALLOWED."""
    layer_of = _layer_of()
    wrong = []
    for importer, imported_modules in sorted(imports.items()):
        for imported in sorted(imported_modules):
            if imported not in layer_of:
                continue  # a module in no layer is reported by test_every_module_has_a_layer
            up = layer_of[imported] - layer_of[importer]
            if up > 0 or (up == 0 and (importer, imported) not in ALLOWED):
                where = "a layer up" if up > 0 else "the same layer"
                wrong.append(f"{importer} (layer {layer_of[importer]}) imports {imported}, {where}")
    return wrong


def test_imports_point_down_the_layers() -> None:
    wrong = _violations({_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")})
    assert not wrong, "imports against the layer rule of ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_every_allowed_entry_is_used_and_same_layer() -> None:
    layer_of = _layer_of()
    for (importer, imported), reason in ALLOWED.items():
        assert reason.strip(), f"{importer} -> {imported}: give the reason"
        assert layer_of[importer] == layer_of[imported], (
            f"{importer} -> {imported}: ALLOWED is for same-layer"
        )
        path = PACKAGE / (importer.replace(".", "/") + ".py")
        assert imported in _imports(path), f"{importer} no longer imports {imported}: drop the entry"


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself can fail: an upward import in a module's source is found."""
    source = tmp_path / "sample.py"
    source.write_text(
        "def f():\n    from rebasin_callbacks.align import align\n    import rebasin_callbacks.trace\n"
        "from rebasin_callbacks import data, weight_matching\n"
    )
    assert _imports(source) == {"align", "trace", "data", "__init__"}
    assert _violations({"permute": _imports(source)}) == [
        "permute (layer 4) imports __init__, a layer up",
        "permute (layer 4) imports align, a layer up",
        "permute (layer 4) imports trace, a layer up",
    ]
    assert _violations({"verify": {"bn"}}) == ["verify (layer 5) imports bn, the same layer"]
    layer_of = _layer_of()
    assert layer_of["align"] > layer_of["spec"] and layer_of["trace"] > layer_of["permute"]
