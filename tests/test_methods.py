"""The method contract: a method defined in one file (here, this test module) with its own section
registers with `register_method` and runs through the command line, with no other edit."""
import copy
import json

import pytest
import yaml
from pydantic import Field

from tandem.cli import main
from tandem.context import RunContext
from tandem.errors import RecipeError
from tandem.fields import Section
from tandem.methods import SECTIONS, get_method, list_methods, register_method, unregister_method

FAST = ["train.epochs=1", "train.progress=false", "report.latency=false"]


class EchoSpec(Section):
    """The test method's own section."""
    scale: float = Field(1.0, gt=0)
    note: str = "plain"


@pytest.fixture
def echo():
    """Registers `echo_test` (section `echo_test:`) for one test; yields the calls its contract saw."""
    calls = []

    def preflight(ctx: RunContext) -> None:
        calls.append(("preflight", ctx.out_dir.exists()))

    def checks(recipe) -> None:
        calls.append(("checks", recipe.echo_test.note))
        if recipe.echo_test.note == "refused":
            raise RecipeError("recipe error: echo_test.note = 'refused': the test's own check says no")

    @register_method("echo_test", sections={"echo_test": EchoSpec}, preflight=preflight, checks=checks)
    def echo_test(ctx: RunContext) -> None:
        calls.append(("run", ctx.recipe.echo_test.scale))
        row = ctx.record("echo_test/copy", copy.deepcopy(ctx.pretrained()), control="baseline")
        row["scale"] = ctx.recipe.echo_test.scale

    yield calls
    unregister_method("echo_test")
    assert "echo_test" not in list_methods() and "echo_test" not in SECTIONS


def test_a_method_defined_in_a_test_module_runs_through_the_cli(echo, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "method=echo_test", "echo_test.scale=2.5", *FAST, "--out", str(out)]) == 0
    # checks at validation, preflight before the run folder exists, then the method
    assert echo == [("checks", "plain"), ("preflight", False), ("run", 2.5)]
    recorded = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recorded["method"] == "echo_test"
    assert recorded["echo_test"] == {"scale": 2.5, "note": "plain"}   # its section, defaults included
    assert "prune" not in recorded and "quant" not in recorded        # sections no method of it reads
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}
    assert list(rows) == ["baseline", "echo_test/copy"]
    assert rows["echo_test/copy"]["scale"] == 2.5 and rows["echo_test/copy"]["control"] == "baseline"
    assert get_method("echo_test").sections == {"echo_test": EchoSpec}


@pytest.mark.parametrize("override, message", [
    ("echo_test.bogus=1", "recipe error: unknown key 'echo_test.bogus'; allowed here: scale, note"),
    ("echo_test.scale=-1", "recipe error: echo_test.scale = -1: Input should be greater than 0"),
    ("echo_test.note=refused", "recipe error: echo_test.note = 'refused': the test's own check says no"),
])
def test_its_section_and_checks_refuse_in_one_line_before_anything_is_written(echo, tmp_path, capsys, override,
                                                                               message):
    out = tmp_path / "run"
    assert main(["run", "method=echo_test", override, *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tandem: error: {message}" and not out.exists()   # one line
    assert ("preflight", False) not in echo and ("run", 2.5) not in echo


def test_its_section_is_refused_for_a_recipe_without_it(echo, tmp_path, capsys):
    assert main(["run", "method=baseline", "echo_test.scale=2", *FAST, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "echo_test: no method of this recipe (baseline) reads it" in err and "(read by: echo_test)" in err


def test_a_section_name_holds_one_model():
    """Two methods may register one model under a section name (prune, quant); another model under a
    taken name is refused where it is registered."""
    class Other(Section):
        x: int = 0

    with pytest.raises(ValueError, match="recipe section 'prune' is registered twice"):
        register_method("other_test", sections={"prune": Other})(lambda ctx: None)
    assert "other_test" not in list_methods() and SECTIONS.get("prune") is get_method("prune").sections["prune"]
    assert get_method("mutual").sections["quant"] is get_method("quantize").sections["quant"]


def test_an_odd_method_value_is_one_recipe_error():
    """`method=` with a mapping in its list is refused as a recipe error (sections_used skips what names no
    method), not a TypeError."""
    from tandem.recipes import load_recipe
    with pytest.raises(RecipeError, match=r"^recipe error: method"):
        load_recipe(None, ["method=[{a: 1}]"])
