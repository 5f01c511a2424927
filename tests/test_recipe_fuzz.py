"""Property-based: malformed recipes always give one line naming the key, exit status 2,
no traceback and no run folder."""
import string

import pytest

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from tandem.cli import main
from tandem.errors import RecipeError
from tandem.recipes import Recipe, load_recipe, method_sections, validate

def _section_type(annotation):
    """The pydantic model of a section field, also behind Optional[...]."""
    for a in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(a, type) and hasattr(a, "model_fields"):
            return a
    return None


SECTIONS = {name: list(_section_type(f.annotation).model_fields) for name, f in Recipe.model_fields.items()
            if _section_type(f.annotation)}
SECTIONS.update({name: list(spec.model_fields) for name, spec in method_sections().items()})   # the methods' own
TOP = [*Recipe.model_fields, *method_sections()]
# values the issue names explicitly, for the sections this version has
OUT_OF_RANGE = [(s, k, v) for s, k, v in [
    ("train", "epochs", -1), ("train", "epochs", -100), ("train", "batch_size", 0), ("train", "lr", 0.0),
    ("train", "lr", -0.1), ("train", "momentum", 1.5), ("train", "gamma", 2.0),
    ("dataset", "val_fraction", 1.5), ("quant", "w_bits", 0), ("quant", "w_bits", 33),
    ("quant", "a_bits", 0), ("quant", "a_bits", 33), ("prune", "ratio", 1.5), ("prune", "ratio", -0.1)]
    if s in SECTIONS and k in SECTIONS[s]]

junk = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                 st.text(string.printable, max_size=12), st.lists(st.integers(-5, 5), max_size=3),
                 st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=5), st.integers(), max_size=2))
key = st.text(string.ascii_lowercase + "_", min_size=1, max_size=10)


@st.composite
def bad_recipe(draw):
    """(recipe, kind): a mostly sensible recipe with one thing broken. Only a 'wrong_value'
    may happen to be valid (random junk that fits the field's type and range)."""
    raw = {"train": {"epochs": 1}, "model": {"name": "small_cnn"}}
    kind = draw(st.sampled_from(["unknown_top", "unknown_nested", "wrong_value", "section_not_mapping",
                                 "out_of_range"]))
    if kind == "unknown_top":
        raw[draw(key.filter(lambda k: k not in TOP))] = draw(junk)
    elif kind == "unknown_nested":
        section = draw(st.sampled_from(sorted(SECTIONS)))
        raw.setdefault(section, {})[draw(key.filter(lambda k: k not in SECTIONS[section]))] = draw(junk)
    elif kind == "wrong_value":
        section = draw(st.sampled_from(sorted(SECTIONS)))
        raw.setdefault(section, {})[draw(st.sampled_from(SECTIONS[section]))] = draw(junk)
    elif kind == "section_not_mapping":
        raw[draw(st.sampled_from(sorted(SECTIONS)))] = draw(st.one_of(st.integers(), st.lists(st.integers())))
    else:
        section, field, value = draw(st.sampled_from(OUT_OF_RANGE))
        raw.setdefault(section, {})[field] = value
    return raw, kind


def keys_in(raw, prefix=""):
    for k, v in raw.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from keys_in(v, f"{prefix}{k}.")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_recipe())
def test_malformed_recipe_is_one_line_naming_a_key(case):
    raw, kind = case
    try:
        validate(raw)
    except RecipeError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith("recipe error:")
        assert any(k in msg for k in keys_in(raw)), msg
    else:
        assert kind == "wrong_value", f"{kind} recipe was accepted: {raw}"


@pytest.mark.parametrize("section, field, value", OUT_OF_RANGE)
def test_named_out_of_range_values_are_rejected(section, field, value):
    raw = {section: {field: value}}
    with pytest.raises(RecipeError) as exc:
        validate(raw)
    assert f"{section}.{field}" in str(exc.value) and str(value) in str(exc.value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_recipe())
def test_cli_rejects_without_traceback_or_folder(case, tmp_path_factory, capsys):
    raw, _ = case
    try:
        validate(raw)
        return                                          # valid: would train; not what this test is about
    except RecipeError:
        pass
    d = tmp_path_factory.mktemp("fuzz")
    path, out = d / "r.yaml", d / "run"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("tandem: error: recipe error:")
    assert not out.exists()


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_yaml_text_never_crashes(text):
    import tempfile, pathlib
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "r.yaml"
        path.write_text(text)
        try:
            load_recipe(path)
        except RecipeError as exc:
            assert "\n" not in str(exc)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(string.printable, max_size=25), max_size=3))
def test_arbitrary_overrides_never_crash(items):
    try:
        load_recipe(None, items)
    except RecipeError as exc:
        assert "\n" not in str(exc)
