import re
from pathlib import Path

import pytest

from tandem.errors import RecipeError
from tandem.recipes import dump_recipe, load_recipe, validate


def test_default_recipe_is_the_digits_job():
    r = load_recipe()
    assert (r.model.name, r.dataset.name, r.name) == ("small_cnn", "digits", "default")
    assert r.methods == ["independent", "mutual", "pqkd"]


def test_method_is_one_name_or_a_list_of_known_distinct_names():
    assert load_recipe(None, ["method=prune"]).methods == ["prune"]
    assert load_recipe(None, ["method=[quantize, prune]"]).methods == ["quantize", "prune"]
    for bad, says in (("method=[]", "non-empty list"), ("method=[mutual, mutual]", "names a method twice"),
                      ("method=[mutual, mutal]", "unknown method; allowed: baseline")):
        with pytest.raises(RecipeError, match=says):
            load_recipe(None, [bad])


def test_overrides_set_nested_values_and_shorthands():
    r = load_recipe(None, ["train.epochs=5", "train.lr=0.2", "model=resnet20", "train.milestones=[2, 4]",
                           "dataset.options.train_size=10"])
    assert r.train.epochs == 5 and r.train.lr == 0.2 and r.model.name == "resnet20"
    assert r.train.milestones == [2, 4] and r.dataset.options == {"train_size": 10}


def test_yaml_file_round_trip(tmp_path):
    r = load_recipe(None, ["train.epochs=3", "seed=7"])
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(r))
    again = load_recipe(path)
    assert again.train.epochs == 3 and again.seed == 7


@pytest.mark.parametrize("override, must_contain", [
    ("train.epoch=3", ["train.epoch", "unknown key", "epochs"]),
    ("train.epochs=-1", ["train.epochs", "-1", "greater than or equal to 0"]),
    ("train.optimizer=rmsprop", ["train.optimizer", "rmsprop", "sgd", "adam"]),
    ("model=resnet21", ["model.name", "resnet21", "resnet20"]),
    ("dataset=imagenet21k", ["dataset.name", "imagenet21k", "digits"]),
    ("dataset.val_fraction=1.5", ["dataset.val_fraction", "1.5", "less than 1"]),
    ("method=magic", ["method", "magic", "baseline"]),
    ("train.milestones=[50]", ["milestones", "50"]),
    ("train.epochs", ["key=value"]),
])
def test_bad_values_name_key_value_and_allowed(override, must_contain):
    with pytest.raises(RecipeError) as exc:
        load_recipe(None, [override])
    msg = str(exc.value)
    assert "\n" not in msg
    for part in must_contain:
        assert part in msg, (part, msg)


def test_broken_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(RecipeError, match=r"bad.yaml is not valid YAML at line"):
        load_recipe(path)


def test_recipe_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(path)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("no/such/recipe.yaml")


def test_wrong_type_section():
    with pytest.raises(RecipeError, match="train"):
        validate({"train": 5})


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem and recipe.method


def test_a_run_folder_from_an_older_version_still_resumes(tmp_path):
    """recipe.yaml written before a field or section existed describes the same recipe."""
    from tandem.recipes import dump_recipe, same_recipe
    recipe = load_recipe(None, ["train.epochs=2"])
    old = "\n".join(line for line in dump_recipe(recipe).splitlines()
                    if not line.startswith(("  no_decay:", "pdd:", "sbs:")))
    (tmp_path / "recipe.yaml").write_text(old)
    assert same_recipe(tmp_path / "recipe.yaml", recipe)
    assert not same_recipe(tmp_path / "recipe.yaml", load_recipe(None, ["train.epochs=3"]))


@pytest.mark.parametrize("key, value", [("pdd.milestones", "[0]"), ("pdd.finetune_milestones", "[0.5,1]"),
                                        ("picpq.milestones", "[2]"), ("sbs.finetune_milestones", "[0.5,1.5]")])
def test_stage_milestones_must_be_fractions_of_the_stage(key, value):
    method = key.split(".")[0]
    with pytest.raises(RecipeError, match=rf"{re.escape(key)} = .*fractions of the stage's epochs, each in \(0, 1\)"):
        load_recipe(None, [f"method={method}", f"{key}={value}"])
    load_recipe(None, [f"method={method}", f"{key}=[0.5]"])   # a fraction is accepted
