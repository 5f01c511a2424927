"""The package's layers import downwards only: no two subpackages import each other (a cycle
is what forced lazy imports and made a new extension touch both sides)."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tandem"


def _edges() -> set[tuple[str, str]]:
    """(a, b) when a module of tandem's top-level part `a` imports from part `b` (anywhere in the
    file, function bodies included)."""
    edges = set()
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        here = parts[0]
        package = parts[:-1] if path.name != "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[: len(package) - (node.level - 1)]) if node.level > 1 else list(package)
                target = base + (node.module.split(".") if node.module else [])
                if not target:    # `from . import x` at the top: x is the part
                    target = [node.names[0].name]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tandem."):
                target = node.module.split(".")[1:]
            else:
                continue
            if target and target[0] != here:
                edges.add((here, target[0]))
    return edges


def test_no_two_parts_import_each_other():
    edges = _edges()
    assert ("recipes", "methods") in edges   # the walk sees imports inside functions (recipes' are all there)
    both_ways = {tuple(sorted(e)) for e in edges if e[::-1] in edges}
    assert ("prune", "quant") not in both_ways      # the straight-through helpers live in tandem/ste.py
    # the recipe validates method names and sections, so recipes imports methods; the methods take their
    # field types from tandem/fields.py and their ctx type from tandem/context.py, never the recipe
    assert not both_ways, both_ways


def test_moved_names_still_import_from_their_old_homes():
    import tandem.recipes
    import tandem.runner
    from tandem.context import RunContext
    from tandem.fields import ArchSpec, Named, Section, StageMilestones
    assert tandem.runner.RunContext is RunContext
    assert (tandem.recipes.ArchSpec, tandem.recipes.StageMilestones) == (ArchSpec, StageMilestones)
    assert (tandem.recipes.Section, tandem.recipes.Named) == (Section, Named)
