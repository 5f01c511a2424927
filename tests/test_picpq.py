"""PIC-PQ: the bit rule against hand-computed values, regularized evolution (mutation, aging,
seeding, resume from its log), the learned criterion's tied scores and MACs target, a tiny run
end to end with its report, and bad input."""
import json
import math

import pytest
import torch

from tandem.cli import main
from tandem.methods.picpq import assign_bits, candidate_removal
from tandem.models import create_model
from tandem.prune import ChannelGraph, MacsModel, apply_removal
from tandem.search.evolution import regularized_evolution

TINY = ["method=picpq", "train.epochs=1", "picpq.evaluations=5", "picpq.population=3", "picpq.sample=2",
        "picpq.search_steps=3", "picpq.finetune_epochs=1", "picpq.qat_epochs=[1,1]", "picpq.prune_away=0.4",
        "train.progress=false"]


def test_bit_rule_matches_hand_computed_values():
    assert assign_bits(1.0, 8, 1 / 6) == 8                      # s = 1: Bmax
    assert assign_bits(0.5, 8, 1 / 6) == 8 - math.ceil(1 / 3)   # 7
    assert assign_bits(0.1, 6, 1 / 6) == 6 - 2                  # ceil(1.667) = 2
    assert assign_bits(0.05, 4, 1 / 6) == 2                     # 4 - ceil(3.33) = 0, clamped to 2
    assert assign_bits(0.05, 4, 1 / 6, min_bits=3) == 3
    assert assign_bits(0.3, 32, 1 / 6) == 32                    # float layers stay float


def _toy(log=None, stop_at=None, seed=0, calls=None, progress=False):
    def initial(rng, i):
        return {"id": i, "x": rng.uniform(-10, 10)}

    def mutate(rng, parent, g):
        assert parent["id"] >= g - 4, "a parent older than the population was sampled (no aging)"
        return {"id": g, "x": parent["x"] + rng.gauss(0, 1)}

    def fitness(c):
        if calls is not None:
            calls.append(c["id"])
        if stop_at is not None and c["id"] == stop_at:
            raise KeyboardInterrupt
        return (c["x"] - 3) ** 2

    return regularized_evolution(fitness, initial, mutate, evaluations=60, population=4, sample=2, seed=seed,
                                 log=log, progress=progress)


def test_evolution_is_seeded_ages_and_improves(tmp_path):
    best, fit = _toy(log=tmp_path / "log.jsonl")
    again, _ = _toy()
    assert best == again                                  # deterministic for a seed
    assert _toy(seed=1)[0] != best
    initial = min(json.loads(line)["fitness"] for line in (tmp_path / "log.jsonl").read_text().splitlines()[:4])
    assert fit < 0.05 < initial                           # mutating the fittest moved towards x = 3


def test_search_progress_in_a_log_is_a_line_per_5_percent(capsys):
    _, fit = _toy(progress=True)   # stderr is not a terminal under pytest
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "search: 3/60 candidates, best fitness " + lines[0].rsplit(" ", 1)[1] and len(lines) == 20
    assert lines[-1] == f"search: 60/60 candidates, best fitness {fit:.4f}" and "\r" not in "".join(lines)


def test_interrupted_search_resumes_from_its_log_to_the_same_best(tmp_path):
    clean = _toy(log=tmp_path / "a.jsonl")
    with pytest.raises(KeyboardInterrupt):
        _toy(log=tmp_path / "b.jsonl", stop_at=25)
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 25
    calls = []
    assert _toy(log=tmp_path / "b.jsonl", calls=calls) == clean
    assert calls == list(range(25, 60))                   # logged candidates are not evaluated again
    with pytest.raises(Exception, match="does not match this search"):
        _toy(log=tmp_path / "b.jsonl", seed=3)


def test_tied_layers_share_one_score_and_the_macs_target_is_met_within_one_channel():
    model = create_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    graph = ChannelGraph(model, x)
    g = torch.Generator().manual_seed(0)
    ranks = {n: torch.rand(layer.out, generator=g) * 8 for n, layer in graph.layers.items() if n != "fc"}
    cand = {"a": {n: 1.0 for n in ranks}, "b": {n: 0.0 for n in ranks}}
    removed = candidate_removal(graph, ranks, cand, 0.5, 0.9)
    stream = next(grp for grp in graph.groups if grp.name == "stem.0")
    assert len(stream.of_kind("out")) == 4                 # stem + the three conv2 of stage 1: one unit
    small = apply_removal(graph, removed)
    widths = {n: m.out_channels for n, m in small.named_modules() if n in ("stem.0", "layer1.0.conv2", "layer1.2.conv2")}
    assert len(set(widths.values())) == 1
    macs = MacsModel(graph)
    for grp in graph.groups:
        if grp.name in removed:
            macs.remove(grp, len(removed[grp.name]))
    base = graph.macs
    assert macs.total <= 0.5 * base
    one_channel = max(MacsModel(graph).total - _after_one(graph, grp) for grp in graph.groups)
    assert macs.total > 0.5 * base - one_channel


def _after_one(graph, group):
    m = MacsModel(graph)
    m.remove(group, 1)
    return m.total


def test_picpq_runs_end_to_end_with_controls_and_a_per_layer_report(tmp_path, capsys, one_thread):
    assert main(["run", *TINY, "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "run"
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}
    assert {"picpq/pruned", "picpq/act-quantized", "picpq/quantized", "picpq/rank-control",
            "picpq/l1-control"} <= set(rows)
    q = rows["picpq/quantized"]
    assert q["control"] == ["picpq/rank-control", "picpq/l1-control"]
    assert q["bops_ratio"] == pytest.approx(rows["baseline"]["bops"] / q["bops"]) and q["bops_ratio"] > 1
    assert rows["picpq/pruned"]["macs"] <= 0.6 * rows["baseline"]["macs"] * (1 + 1e-9)
    assert all("sparsity" in layer for layer in q["layers"])
    assert [layer["w_bits"] for layer in q["layers"]] == [q["bits"][layer["name"]] for layer in q["layers"]]
    assert len((out / "picpq" / "search.jsonl").read_text().splitlines()) == 5
    report = (out / "report.md").read_text()
    assert "### picpq/quantized: per layer" in report and "sparsity" in report


def test_bad_input_is_one_line_exit_2_no_folder(refused):
    cases = [(["picpq.prune_away=1.0"], "picpq.prune_away = 1.0"), (["picpq.prune_away=0"], "picpq.prune_away = 0"),
             (["picpq.penalty=0"], "picpq.penalty = 0"),
             (["picpq.max_bits=[32,8]"], "picpq.max_bits has 2 entries; the model has 4 conv/linear layers")]
    refused(TINY, cases)
