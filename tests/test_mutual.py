"""mutual / independent (a pruned and a quantized peer, DML vs alone) and `tandem grid`, on digits."""
import json

import pytest
import torch

from tandem.cli import main
from tandem.distill.spec import MutualSpec
from tandem.methods import get_method
from tandem.distill.objectives import KLRamp, dml_objective
from tandem.methods.mutual import WithAdapters, _feature_hints
from tandem.models import create_model
from tandem.prune import prune
from tandem.quant import QuantSpec, calibrate, quantize_
from tandem.recipes import load_recipe
from tandem.runner import RunContext

TINY = ["train.progress=false", "train.epochs=3", "train.batch_size=64", "mutual.epochs=2"]


def _peers():
    torch.manual_seed(0)
    base = create_model("small_cnn", num_classes=10, in_channels=1)
    x = torch.randn(16, 1, 8, 8)
    p = prune(base, x[:1], "l1", macs_target=0.5)
    q = quantize_(create_model("small_cnn", num_classes=10, in_channels=1), QuantSpec(method="lsq"))
    q.load_state_dict(base.state_dict(), strict=False)
    calibrate(q, [x])
    return base, p, q, x, torch.randint(0, 10, (16,))


def _grads(net):
    return [None if prm.grad is None else prm.grad.clone() for prm in net.parameters()]


@pytest.mark.parametrize("extras", [False, True], ids=["dml", "dml+kd+hint"])
def test_each_peer_gets_exactly_the_gradient_of_its_own_loss(extras):
    base, p, q, x, y = _peers()
    ms = MutualSpec(kd_weight=0.5 if extras else 0.0, feature_weight=0.3 if extras else 0.0,
                    feature_layers=["features.1"] if extras else [])

    class Ctx:
        input_size, device = (1, 8, 8), torch.device("cpu")
    hints = _feature_hints(Ctx, ms, p, q) if extras else None
    p_train = WithAdapters(p, hints[2]) if extras else p
    objective = dml_objective(ms, "teacher" if extras else None, hints)

    def losses():
        for net in (p_train, q):
            net.zero_grad(set_to_none=True)
        out = {"pruned": p_train(x), "quantized": q(x)}
        if extras:
            with torch.no_grad():
                out["teacher"] = base(x)
        return objective(out, y, x)

    own = {peer: {k: v for k, v in losses().items()} for peer in ("pruned", "quantized")}
    assert set(own["pruned"]) == ({"ce/pruned", "kl/pruned", "ce/quantized", "kl/quantized"}
                                  | ({"kd/pruned", "kd/quantized", "hint/pruned"} if extras else set()))
    # Q's terms alone leave every parameter of P (and its adapters) without a gradient, and back
    terms = losses()
    sum(v for k, v in terms.items() if k.endswith("/quantized")).backward()
    assert all(g is None or not g.any() for g in _grads(p_train))
    q_own = _grads(q)
    assert any(g is not None and g.abs().sum() > 0 for g in q_own)
    terms = losses()
    sum(v for k, v in terms.items() if k.endswith("/pruned")).backward()
    assert all(g is None or not g.any() for g in _grads(q))
    p_own = _grads(p_train)
    assert any(g is not None and g.abs().sum() > 0 for g in p_own)
    if extras:
        assert any(prm.grad is not None and prm.grad.abs().sum() > 0 for prm in hints[2].parameters())
    # the engine's single backward of the sum gives each peer exactly its own gradient
    sum(losses().values()).backward()
    for mine, net in ((p_own, p_train), (q_own, q)):
        for a, b in zip(mine, _grads(net)):
            assert (a is None and (b is None or not b.any())) or torch.allclose(a, b, atol=1e-6)


def test_independent_and_mutual_on_one_context(tmp_path, one_thread):
    recipe = load_recipe(None, TINY + ["method=mutual", "quant.first_last=same", "quant.method=dorefa",
                                       "quant.w_bits=4", "quant.a_bits=4"])
    ctx = RunContext(recipe, tmp_path / "run")
    get_method("independent")(ctx)
    get_method("mutual")(ctx)
    rows = {r["name"]: r for r in ctx.results}
    assert list(rows) == ["baseline", "independent/init-pruned", "independent/init-quantized", "independent/pruned",
                          "independent/quantized", "mutual/init-pruned", "mutual/init-quantized", "mutual/pruned",
                          "mutual/quantized"]
    base = rows["baseline"]
    for peer in ("pruned", "quantized"):   # both methods start from the same peers: the same start rows
        start = rows[f"mutual/init-{peer}"]
        assert start["init"] and "model_file" not in start
        assert (start["top1"], start["val_top1"]) == (rows[f"independent/init-{peer}"]["top1"],
                                                      rows[f"independent/init-{peer}"]["val_top1"])
    for method in ("independent", "mutual"):
        p, q = rows[f"{method}/pruned"], rows[f"{method}/quantized"]
        assert p["macs"] < 0.6 * base["macs"] and p["params"] < base["params"] and p["w_bits"] == 32
        assert q["w_bits"] == 4 and q["a_bits"] == 4 and q["bops"] == q["macs"] * 16 and q["bytes"] < base["bytes"]
        assert p["stage"] == q["stage"] == f"{method}-joint"
        assert p["top1"] > 30 and q["top1"] > 30
        assert (tmp_path / "run" / "stages" / f"{method}-joint" / "done.json").exists()
    # the two joint phases trained differently (mutual's KL terms), from the same starting peers
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("kl/pruned" in r for r in log if r["stage"] == "mutual-joint")
    assert not any("kl/pruned" in r for r in log if r["stage"] == "independent-joint")


def test_soft_sequential_kd_hint_run_ends_with_smaller_p_and_reports_gain(tmp_path, one_thread):
    out = tmp_path / "run"
    assert main(["run", *TINY, "method=mutual", "prune.criterion=fpgm", "prune.schedule=soft",
                 "mutual.update=sequential", "mutual.kd_weight=0.5", "mutual.feature_weight=0.1",
                 "mutual.feature_layers=[features.3]", "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}
    p, base = rows["mutual/pruned"], rows["baseline"]
    assert p["params"] < 0.7 * base["params"] and p["macs"] < 0.6 * base["macs"]   # physically smaller
    from tandem.engine import load_model
    small = load_model(out / "models" / "mutual-pruned.safetensors")[0]
    assert sum(t.numel() for t in small.parameters()) < sum(
        t.numel() for t in load_model(out / "models" / "baseline.safetensors")[0].parameters())
    assert "gain_over_independent" not in p    # no control in this run


def test_grid_runs_resumes_skips_and_reports(tmp_path, one_thread, capsys):
    out = tmp_path / "grid"
    args = ["grid", "--pruners", "l1", "--quantizers", "dorefa,lsq", "--out", str(out), *TINY]
    assert main(args) == 0
    summary = json.loads((out / "grid.json").read_text())
    assert [(c["pruner"], c["quantizer"]) for c in summary["pairs"]] == [("l1", "dorefa"), ("l1", "lsq")]
    for c in summary["pairs"]:
        for peer in ("pruned", "quantized"):
            d = c[peer]
            assert d["gain"] == pytest.approx(d["mutual_top1"] - d["independent_top1"])
        assert c["pruned"]["macs"] < summary["baseline"]["macs"] and c["quantized"]["bops"] < summary["baseline"]["bops"]
        cell = json.loads((out / c["folder"] / "results.json").read_text())
        # every cell started from the one baseline trained in DIR/baseline
        assert cell["recipe"]["model"]["checkpoint"] == summary["checkpoint"]
        assert cell["methods"] == ["independent", "mutual"]
        assert any("gain_over_independent" in r for r in cell["models"])
    assert "| l1 (one_shot) | lsq |" in (out / "grid.md").read_text()
    assert (out / "grid.png").stat().st_size > 1000
    assert not (out / "baseline" / "stages" / "independent-joint").exists()
    files = sorted(out.rglob("*.safetensors")) + sorted(out.rglob("results.json"))
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    capsys.readouterr()

    # an interrupted cell (no results.json) resumes; finished ones are not trained again
    (out / "l1-lsq" / "results.json").unlink()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "l1-dorefa is finished already; skipped" in err and "l1-lsq was interrupted; resuming" in err
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items() if "l1-lsq" not in str(f))
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items() if "stages" in str(f))
    # a changed recipe is refused instead of mixing its cells with the finished ones
    assert main([*args, "mutual.kl_weight=0.5"]) == 2
    assert "different recipe" in capsys.readouterr().err
    again = json.loads((out / "grid.json").read_text())["pairs"]
    assert [(c["pruned"], c["quantized"]) for c in again] == [(c["pruned"], c["quantized"]) for c in summary["pairs"]]


@pytest.mark.parametrize("flag, bad, allowed", [("--pruners", "l1,nope", "fpgm"), ("--quantizers", "lsq,int3", "dorefa")])
def test_grid_bad_names_one_line(tmp_path, capsys, flag, bad, allowed):
    assert main(["grid", flag, bad, "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and bad.split(",")[1] in err and allowed in err and flag in err
    assert not (tmp_path / "g").exists()


def test_grid_soft_schedule_goes_to_the_soft_methods_only():
    from tandem.grid import _schedule
    soft = load_recipe(None, ["prune.schedule=soft"])
    assert [_schedule(soft, p) for p in ("fpgm", "l1", "hrank")] == ["soft", "one_shot", "one_shot"]
    assert _schedule(load_recipe(None, ["prune.schedule=iterative"]), "hrank") == "iterative"


def test_peers_from_scratch_record_no_baseline_and_refuse_random_weight_ranking(tmp_path, one_thread, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY, "method=[independent,mutual]", "mutual.init=scratch",
                 "mutual.kl_weight={pruned: 0.5, quantized: 1.0}", "mutual.kl_rampup_epochs=1",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in results["models"] if not r.get("init")]
    assert names == ["independent/pruned", "independent/quantized", "mutual/pruned", "mutual/quantized"]
    starts = {r["name"]: r["top1"] for r in results["models"] if r.get("init")}
    assert max(starts.values()) < 40   # from scratch: the peers start at chance (10 classes), as DML's cohort
    assert not (out / "stages" / "baseline").exists()          # nothing was pretrained
    assert results["recipe"]["mutual"]["init"] == "scratch"
    for bad in (["prune.scope=global"], ["prune.schedule=iterative"]):
        assert main(["run", *TINY, "method=mutual", "mutual.init=scratch", *bad, "--out", str(tmp_path / "x")]) == 2
        assert "mutual.init = 'scratch'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_kl_ramp_rises_linearly_with_steps_and_resumes_from_the_step_count():

    class T:
        steps_per_epoch = 10
    ramp, t = KLRamp(2.0), T()
    seen = []
    for t.step in (0, 5, 10, 20, 35):
        ramp.before_step(t)
        seen.append(ramp.factor)
    assert seen == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert KLRamp(0).factor == 1.0
