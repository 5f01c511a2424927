"""`--seeds`: statistics over seeds (tandem/summary.py) and the run / grid commands that write them."""
import json
import math

import pytest

from tandem.cli import main
from tandem.summary import describe, grid_rows, paired_stats, row_stats, summarize, t95

FAST = ["train.epochs=1", "mutual.epochs=1", "train.progress=false"]


def test_describe_against_hand_computed_values():
    d = describe([1.0, 2.0, 6.0])                      # mean 3; squares 4 + 1 + 9 = 14; s^2 = 14 / 2
    assert d["n"] == 3 and d["mean"] == pytest.approx(3.0)
    assert d["std"] == pytest.approx(math.sqrt(7))
    assert t95(3) == pytest.approx(4.303, abs=1e-3) and t95(2) == pytest.approx(12.706, abs=1e-3)
    assert d["ci95"] == pytest.approx(4.3027 * math.sqrt(7) / math.sqrt(3), rel=1e-4)
    assert describe([5.0]) == {"n": 1, "mean": 5.0, "std": None, "ci95": None}
    assert t95(1) is None


def _rows(m, c, other=None):
    rows = [{"name": "independent/pruned", "top1": c, "macs": 100},
            {"name": "mutual/pruned", "top1": m, "macs": 100, "control": "independent/pruned"}]
    return rows + ([{"name": "baseline", "top1": other, "macs": 300}] if other is not None else [])


def test_paired_and_row_statistics_against_hand_computed_values():
    seeds = [0, 1, 2, 3]
    per_seed = [_rows(71.0, 70.0, 90.0), _rows(69.5, 70.0, 91.0), _rows(74.0, 72.0, 92.0),
                [{"name": "mutual/pruned", "top1": 50.0, "control": "independent/pruned"}]]   # seed 3: no control
    (p,) = paired_stats(seeds, per_seed)
    assert (p["method"], p["control"], p["n"], p["seeds"]) == ("mutual/pruned", "independent/pruned", 3, [0, 1, 2])
    assert p["diffs"] == pytest.approx([1.0, -0.5, 2.0]) and p["wins"] == 2
    assert p["mean_diff"] == pytest.approx(2.5 / 3)
    s = math.sqrt(((1 - 2.5 / 3) ** 2 + (-0.5 - 2.5 / 3) ** 2 + (2 - 2.5 / 3) ** 2) / 2)
    assert p["ci95_diff"] == pytest.approx(4.3027 * s / math.sqrt(3), rel=1e-4)

    rows = {r["name"]: r for r in row_stats(seeds, per_seed)}
    assert list(rows) == ["independent/pruned", "mutual/pruned", "baseline"]
    b = rows["baseline"]
    assert (b["n"], b["mean_top1"], b["std_top1"], b["mean_macs"]) == (3, pytest.approx(91.0), pytest.approx(1.0), 300)
    assert b["ci95_top1"] == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert rows["mutual/pruned"]["n"] == 4 and rows["mutual/pruned"]["seeds"] == [0, 1, 2, 3]
    one = summarize([7], [_rows(71.0, 70.0)])
    assert one["seeds"] == [7] and one["rows"][0]["std_top1"] is None and one["paired"][0]["ci95_diff"] is None


def test_grid_rows_count_each_control_once():
    def cell(ip, iq, mp, mq):
        return [{"name": "baseline", "top1": 90.0}, {"name": "independent/pruned", "top1": ip},
                {"name": "independent/quantized", "top1": iq}, {"name": "mutual/pruned", "top1": mp},
                {"name": "mutual/quantized", "top1": mq}]
    cells = [("l1", "lsq", cell(60, 70, 61, 71)), ("l1", "pact", cell(60, 75, 62, 74)),
             ("fpgm", "lsq", cell(65, 70, 64, 72)), ("fpgm", "pact", cell(65, 75, 66, 76))]
    rows = grid_rows(cells)
    assert [r["name"] for r in rows] == [
        "baseline", "independent/pruned[l1]", "independent/pruned[fpgm]", "l1-lsq/mutual/pruned",
        "l1-pact/mutual/pruned", "fpgm-lsq/mutual/pruned", "fpgm-pact/mutual/pruned",
        "independent/quantized[lsq]", "independent/quantized[pact]", "l1-lsq/mutual/quantized",
        "l1-pact/mutual/quantized", "fpgm-lsq/mutual/quantized", "fpgm-pact/mutual/quantized"]
    by = {r["name"]: r for r in rows}
    assert by["fpgm-pact/mutual/quantized"]["control"] == "independent/quantized[pact]"
    assert by["l1-pact/mutual/pruned"]["control"] == "independent/pruned[l1]"
    assert {p["method"]: p["diffs"] for p in paired_stats([0], [rows])}["fpgm-lsq/mutual/quantized"] == [2]


def test_two_seeds_write_summary_and_resume_retrains_nothing_finished(tmp_path, one_thread, capsys):
    out = tmp_path / "seeds"
    assert main(["run", *FAST, "--seeds", "0", "1", "--out", str(out)]) == 0
    per_seed = {}
    for seed in (0, 1):
        results = json.loads((out / f"seed{seed}" / "results.json").read_text())
        assert results["recipe"]["seed"] == seed
        per_seed[seed] = {r["name"]: r for r in results["models"]}
    rows = per_seed[0]
    assert rows["mutual/pruned"]["control"] == "independent/pruned"
    assert rows["mutual/quantized"]["control"] == "independent/quantized"
    assert rows["pqkd/distilled"]["control"] == "pqkd/no-kd"
    assert not any("control" in r for n, r in rows.items() if n not in ("mutual/pruned", "mutual/quantized", "pqkd/distilled"))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["command"] == "run"
    assert [r["name"] for r in summary["rows"]] == list(rows)
    for r in summary["rows"]:
        vals = [per_seed[s][r["name"]]["top1"] for s in (0, 1)]
        assert r["n"] == 2 and r["mean_top1"] == pytest.approx(sum(vals) / 2)
        assert r["std_top1"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    paired = {p["method"]: p for p in summary["paired"]}
    assert {m: p["control"] for m, p in paired.items()} == {
        "mutual/pruned": "independent/pruned", "mutual/quantized": "independent/quantized",
        "pqkd/distilled": "pqkd/no-kd"}
    for m, p in paired.items():
        assert p["diffs"] == pytest.approx([per_seed[s][m]["top1"] - per_seed[s][p["control"]]["top1"] for s in (0, 1)])
        assert p["wins"] == sum(d > 0 for d in p["diffs"])
    md = (out / "summary.md").read_text()
    assert "contains 0 does not show a difference" in md and "| mutual/pruned | independent/pruned | 2 |" in md
    assert (out / "summary.png").stat().st_size > 1000

    # an interrupted seed resumes, a finished one is read: nothing of seed0 and no finished stage is trained again
    (out / "seed1" / "results.json").unlink()
    files = [f for f in out.rglob("*") if f.is_file() and f.parent != out]
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    capsys.readouterr()
    assert main(["run", "--resume", "--out", str(out)]) == 0   # the seeds come from OUT/seeds.json
    err = capsys.readouterr().err
    assert "seed0 is finished already; skipped" in err and "seed1 was interrupted; resuming it" in err
    assert (out / "seed1" / "results.json").exists()
    changed = [f for f, t in mtimes.items() if f.stat().st_mtime_ns != t]
    assert all("seed1" in str(f) and "stages" not in str(f) for f in changed)
    again = json.loads((out / "summary.json").read_text())
    assert again["rows"] == summary["rows"] and again["paired"] == summary["paired"]


def test_seeds_override_a_recipe_files_seed(tmp_path, one_thread):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: baseline\nseed: 7\ntrain: {epochs: 1, progress: false}\n")
    assert main(["run", str(recipe), "--seeds", "3", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "seed3" / "results.json").read_text())["recipe"]["seed"] == 3
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["paired"] == []


@pytest.mark.parametrize("args, says", [
    (["run", "--seeds", "0", "0"], "given twice"),
    (["run", "--seeds", "0", "-1"], "negative"),
    (["run", "seed=1", "--seeds", "0", "1"], "seed= override"),
    (["run", "--nproc", "2", "--seeds", "0", "1"], "one after another"),
    (["run", "--seeds", "0", "train.epochs=1"], "before --seeds"),
    (["grid", "--seeds", "2", "2"], "given twice"),
    (["grid", "--seeds", "-3"], "negative"),
    (["grid", "seed=1", "--seeds", "0"], "seed= override"),
])
def test_bad_seeds_are_one_line_exit_2(tmp_path, capsys, args, says):
    out = tmp_path / "never"
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tandem: error: ") and "\n" not in err and says in err
    assert not out.exists()


def test_grid_over_seeds_counts_controls_once(tmp_path, one_thread):
    out = tmp_path / "grid"
    assert main(["grid", "--pruners", "l1,fpgm", "--quantizers", "dorefa,lsq", *FAST, "train.batch_size=64",
                 "--seeds", "0", "1", "--out", str(out)]) == 0
    def rows(folder):
        return {r["name"]: r["top1"] for r in json.loads((folder / "results.json").read_text())["models"]}
    seed0 = out / "seed0"
    cells = {(p, q): rows(seed0 / f"{p}-{q}") for p in ("l1", "fpgm") for q in ("dorefa", "lsq")}
    # controls run on the diagonal only: (l1, dorefa) and (fpgm, lsq)
    assert "independent/pruned" in cells["l1", "dorefa"] and "independent/pruned" in cells["fpgm", "lsq"]
    assert "independent/pruned" not in cells["l1", "lsq"] and "independent/quantized" not in cells["fpgm", "dorefa"]
    # what justifies that: an off-diagonal cell's independent peers are the same networks, the
    # quantized one whatever the pruner, the pruned one whatever the quantizer
    from tandem.recipes import load_recipe
    from tandem.runner import run
    off = load_recipe(str(seed0 / "fpgm-lsq" / "recipe.yaml"), ["method=independent", "prune.criterion=l1"])
    alone = {r["name"]: r["top1"] for r in run(off, tmp_path / "off-diagonal")["models"]}
    assert alone["independent/quantized"] == cells["fpgm", "lsq"]["independent/quantized"]
    assert alone["independent/pruned"] == cells["l1", "dorefa"]["independent/pruned"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] == "grid" and summary["seeds"] == [0, 1]
    names = [r["name"] for r in summary["rows"]]
    assert [n for n in names if n.startswith("independent/")] == [
        "independent/pruned[l1]", "independent/pruned[fpgm]",
        "independent/quantized[dorefa]", "independent/quantized[lsq]"]
    assert len(summary["paired"]) == 8 and all(p["n"] == 2 for p in summary["paired"])
    p = next(p for p in summary["paired"] if p["method"] == "fpgm-lsq/mutual/quantized")
    assert p["control"] == "independent/quantized[lsq]"
    assert "Controls are counted once" in (out / "summary.md").read_text()
    assert (out / "seed1" / "grid.json").exists() and (out / "summary.png").stat().st_size > 1000


@pytest.mark.parametrize("pruners, quantizers, n", [(["a", "b", "c"], ["x", "y", "z"], 3), (["a"], ["x", "y"], 2),
                                                    (["a", "b", "c"], ["x"], 3), (["a", "b"], ["x", "y", "z"], 3)])
def test_control_cells_cover_every_pruner_and_quantizer_with_the_fewest_cells(pruners, quantizers, n):
    from tandem.grid import control_cells
    cells = control_cells(pruners, quantizers)
    assert len(cells) == n == max(len(pruners), len(quantizers))
    assert {p for p, _ in cells} == set(pruners) and {q for _, q in cells} == set(quantizers)
