"""pqkd (methods.md §2.3): prune -> quantize -> distill from the uncompressed teacher, on digits."""
import json

import pytest
import torch

from tandem.engine import load_model
from tandem.errors import TandemError
from tandem.methods import get_method
from tandem.distill.objectives import kd_objective
from tandem.methods.pqkd import check_zeros_kept
from tandem.distill.spec import DistillSpec
from tandem.prune.masks import apply_weight_masks, magnitude_masks
from tandem.quant import QUANT_LAYERS, KMeansWeight, calibrate, quantize_
from tandem.recipes import load_recipe
from tandem.runner import RunContext, run

TINY = ["train.epochs=3", "train.progress=false", "prune.finetune_epochs=1", "quant.epochs=1", "distill.epochs=1",
        "distill.lr=0.01", "quant.first_last=same"]


def _rows(results):
    return {r["name"]: r for r in results["models"]}


def _model(out, row):
    return load_model(out / row["model_file"])[0]


def test_structured_lsq_after_other_methods_on_one_ctx(tmp_path, one_thread):
    """Structured L1 + LSQ W4A4 on a ctx whose teacher exists and another method already ran:
    rows in stage order, physically smaller distilled model with the quantized bits, the
    teacher untouched by KD and still trainable afterwards, the control trained alongside."""
    recipe = load_recipe(None, ["method=pqkd", *TINY, "prune.criterion=l1", "prune.macs_target=0.5",
                                "quant.w_bits=4", "quant.a_bits=4", "quant.first_last=same"])
    ctx = RunContext(recipe, tmp_path)
    teacher = ctx.pretrained()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    get_method("prune")(ctx)
    get_method("pqkd")(ctx)

    names = [r["name"] for r in ctx.results]
    assert names == ["baseline", "pruned", "pqkd/pruned", "pqkd/init", "pqkd/quantized", "pqkd/distilled", "pqkd/no-kd"]
    rows = {r["name"]: r for r in ctx.results}
    assert [rows[n]["stage"] for n in names[2:]] == ["pqkd-finetune", "pqkd-quantize", "pqkd-quantize",
                                                     "pqkd-distill", "pqkd-distill"]
    start = rows["pqkd/init"]   # the pruned student quantized and calibrated, before its QAT
    assert start["init"] and (start["macs"], start["w_bits"]) == (rows["pqkd/pruned"]["macs"], 4)
    base, pruned, quant, dist, ctrl = (rows[n] for n in ["baseline", "pqkd/pruned", "pqkd/quantized",
                                                          "pqkd/distilled", "pqkd/no-kd"])
    assert pruned["macs"] <= 0.5 * base["macs"] and pruned["params"] < base["params"]
    for r in (quant, dist, ctrl):
        assert (r["macs"], r["params"]) == (pruned["macs"], pruned["params"])
        assert (r["w_bits"], r["a_bits"]) == (4, 4)
    assert (pruned["w_bits"], base["w_bits"]) == (32, 32)
    assert dist["gain_over_quantized"] == pytest.approx(dist["top1"] - quant["top1"])
    assert dist["gain_over_no_kd"] == pytest.approx(dist["top1"] - ctrl["top1"])
    assert ctrl["gain_over_quantized"] == pytest.approx(ctrl["top1"] - quant["top1"])

    # the teacher: same weights and BN statistics, trainable again for later methods
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in teacher.parameters())
    # KD trained the student: distilled, control and quantized all differ
    q, d, c = (_model(tmp_path, r).state_dict() for r in (quant, dist, ctrl))
    weights = [k for k in q if k.endswith("weight") and q[k].is_floating_point()]
    assert any(not torch.equal(q[k], d[k]) for k in weights)
    assert any(not torch.equal(d[k], c[k]) for k in weights)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kd = [r for r in lines if r["stage"] == "pqkd-distill"]
    assert kd and kd[0]["kd/distilled"] > 0 and "ce/no-kd" in kd[0] and "kd/no-kd" not in kd[0]


@pytest.mark.parametrize("quant", [["quant.method=kmeans", "quant.a_bits=32"], ["quant.method=lsq"]])
def test_unstructured_zeros_stay_zero_through_quantization_and_kd(tmp_path, one_thread, quant):
    out = tmp_path / "run"
    recipe = load_recipe(None, ["method=pqkd", *TINY, "prune.criterion=magnitude", "prune.ratio=0.6",
                                "distill.control=false", "quant.w_bits=4", *quant])
    rows = _rows(run(recipe, out))
    assert [n for n in rows] == ["baseline", "pqkd/pruned", "pqkd/init", "pqkd/quantized", "pqkd/distilled"]
    pruned, quant_row, dist = rows["pqkd/pruned"], rows["pqkd/quantized"], rows["pqkd/distilled"]
    assert pruned["nonzero_macs"] < 0.5 * pruned["macs"]
    assert quant_row["nonzero_macs"] == dist["nonzero_macs"] == pruned["nonzero_macs"]
    assert dist["macs"] == rows["baseline"]["macs"] and dist["w_bits"] == 4
    report = (out / "report.md").read_text()
    assert "nonzero MACs" in report and "gain over quantized" in report

    p_net, q_net, d_net = (_model(out, r) for r in (pruned, quant_row, dist))
    p_layers = dict(p_net.named_modules())
    checked = 0
    for name, layer in d_net.named_modules():
        if not isinstance(layer, QUANT_LAYERS):
            continue
        zero = p_layers[name].weight == 0
        assert zero.any()
        q_layer = q_net.get_submodule(name)
        for net_layer in (q_layer, layer):          # after QAT / centroid fine-tuning and after KD
            assert (net_layer.weight[zero] == 0).all() and (net_layer.quantized_weight()[zero] == 0).all()
        if isinstance(layer.weight_quantizer, KMeansWeight):
            # the codebook learned: not the k-means of the pruned weights any more, and not frozen by KD
            fresh = KMeansWeight(4, shape=p_layers[name].weight.shape)
            fresh.calibrate_weight(p_layers[name].weight)
            assert not torch.allclose(q_layer.weight_quantizer.centroids, fresh.centroids)
            assert not torch.equal(q_layer.weight_quantizer.centroids, layer.weight_quantizer.centroids)
            assert torch.equal(layer.weight, p_layers[name].weight)   # shared weights: the layer's own is frozen
        checked += 1
    assert checked >= 3

    # resuming the finished run trains nothing and gives the same rows
    again = _rows(run(recipe, out, resume=True))
    assert {n: r["top1"] for n, r in again.items()} == {n: r["top1"] for n, r in rows.items()}
    assert again["pqkd/distilled"]["nonzero_macs"] == dist["nonzero_macs"]


def test_quantizer_that_revives_pruned_weights_is_refused():
    torch.manual_seed(0)
    from tandem.models import create_model
    for method, ok in (("dorefa", False), ("lsq", True)):
        net = create_model("small_cnn", num_classes=10, in_channels=1)
        masks = magnitude_masks(net, 0.5)
        apply_weight_masks(net, masks)
        quantize_(net, method=method, w_bits=4, a_bits=4, first_last="same")
        calibrate(net, [torch.randn(8, 1, 8, 8)])
        if ok:
            check_zeros_kept(net, masks, method)
        else:
            with pytest.raises(TandemError, match=r"quant.method = 'dorefa' .* pruned \(zero\) weights"):
                check_zeros_kept(net, masks, method)


def test_kd_objective_is_hinton_for_the_student_and_ce_for_the_control():
    torch.manual_seed(0)
    z = {"distilled": torch.randn(6, 10, requires_grad=True), "no-kd": torch.randn(6, 10),
         "teacher": torch.randn(6, 10, requires_grad=True)}
    y = torch.randint(0, 10, (6,))
    losses = kd_objective(alpha=0.7, temperature=3.0)(z, y, None)
    assert set(losses) == {"ce/distilled", "kd/distilled", "ce/no-kd"}
    ce = torch.nn.functional.cross_entropy
    assert losses["ce/distilled"].item() == pytest.approx(0.3 * ce(z["distilled"], y).item(), rel=1e-5)
    assert losses["ce/no-kd"].item() == pytest.approx(ce(z["no-kd"], y).item(), rel=1e-5)
    sum(losses.values()).backward()
    assert z["teacher"].grad is None and z["distilled"].grad is not None
    only_ce = kd_objective(alpha=0.0)(z, y, None)
    assert only_ce["kd/distilled"].item() == 0


def test_distill_control_default_follows_protocol():
    from types import SimpleNamespace

    from tandem.methods.pqkd import _control

    def ctx(protocol):
        return SimpleNamespace(recipe=load_recipe(None, ["method=pqkd", f"protocol={protocol}"]))
    assert _control(ctx("cpu-small"), DistillSpec()) and not _control(ctx("paper"), DistillSpec())
    assert _control(ctx("paper"), DistillSpec(control=True)) and not _control(ctx("smoke"), DistillSpec(control=False))
    assert load_recipe(None, ["method=pqkd", "distill.control=false"]).distill.control is False
