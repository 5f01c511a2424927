"""Run settings that keep evidence honest: the validation split does not move with the run
seed, and an augmentation that cannot happen is refused rather than ignored."""
import torch

from tandem.recipes import load_recipe
from tandem.runner import RunContext


def test_validation_split_is_fixed_across_run_seeds_and_moves_with_split_seed(tmp_path):
    def val(*overrides):
        return RunContext(load_recipe(None, list(overrides)), tmp_path / "unused").data.val
    a, b, c = val("seed=0"), val("seed=3"), val("seed=3", "dataset.split_seed=1")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_augment_true_without_augmentation_is_refused_before_any_file(refused):
    refused([], [(["dataset.augment=true"], "dataset.augment = true, but digits")])
