"""Every method that quantizes or gates records its network as training starts (`<method>/init`):
on a trained baseline at 8 bits that start is the baseline's accuracy, within a few points (a
broken start, e.g. DoReFa's [0, 1] clamp on a pretrained network, shows as a row near chance)."""
import json

import pytest

from tandem.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTHS = "[8,8,8,8,8,8,8,16,16,16,16,16,16,32,32,32,32,32,32]"
CLOSE = 3.0   # points; digits' 144 validation and 359 test images: one image is 0.7 / 0.28 points


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A pre-activation ResNet-20 at half width trained on digits (about 95%), as a model file."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["run", "method=baseline", "model=preact_resnet20", f"model.widths={WIDTHS}", "train.epochs=8",
                 "train.progress=false", "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["models"][0]
    assert row["top1"] > 85
    return out / row["model_file"], row


def _rows(out):
    return {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}


def _near(start, base):
    assert start["init"] and "model_file" not in start
    assert abs(start["val_top1"] - base["val_top1"]) <= CLOSE and abs(start["top1"] - base["top1"]) <= CLOSE, \
        (start["name"], start["val_top1"], start["top1"], base["val_top1"], base["top1"])


@pytest.mark.parametrize("method", ["lsq", "pact", "dorefa", "dorefa_picpq"])
def test_quantize_starts_at_the_baselines_accuracy_at_8_bits(baseline, tmp_path, method):
    path, base = baseline
    out = tmp_path / "run"
    assert main(["run", "method=quantize", f"model.checkpoint={path}", f"quant.method={method}", "quant.w_bits=8",
                 "quant.a_bits=8", "quant.epochs=0", "train.progress=false", "--out", str(out)]) == 0
    _near(_rows(out)["quantize/init"], base)


def test_dorefas_paper_clamp_is_the_broken_start_the_init_row_shows(baseline, tmp_path):
    path, base = baseline
    out = tmp_path / "run"
    assert main(["run", "method=quantize", f"model.checkpoint={path}", "quant.method=dorefa", "quant.w_bits=8",
                 "quant.a_bits=8", "quant.act_init=paper", "quant.epochs=0", "train.progress=false",
                 "--out", str(out)]) == 0
    assert _rows(out)["quantize/init"]["val_top1"] < base["val_top1"] - 10


def test_sbs_starts_at_the_baselines_accuracy_with_every_gate_open(baseline, tmp_path):
    path, base = baseline
    out = tmp_path / "run"
    assert main(["run", "method=sbs", f"model.checkpoint={path}", "sbs.group_size=2", "sbs.search_epochs=1",
                 "sbs.finetune_epochs=0", "sbs.controls=[uniform4]", "train.progress=false", "--out", str(out)]) == 0
    rows = _rows(out)
    _near(rows["sbs/init"], base)
    assert (rows["sbs/init"]["w_bits"], rows["sbs/init"]["a_bits"]) == (8, 8)
    assert rows["sbs/init-4bit"]["init"] and rows["sbs/init-4bit"]["bops"] < rows["sbs/init"]["bops"]


def test_init_row_tells_stale_batchnorm_statistics_from_a_broken_start(baseline, tmp_path):
    """A start that is low only because its stored BN statistics are stale (as after one-shot
    pruning) is high in `val_top1_bn_reestimated`; the re-estimation works on a copy and draws
    no random numbers, so the method's training is unchanged."""
    import torch

    from tandem.recipes import load_recipe
    from tandem.runner import RunContext

    path, base = baseline
    ctx = RunContext(load_recipe(None, ["model=preact_resnet20", f"model.widths={WIDTHS}",
                                        f"model.checkpoint={path}", "train.progress=false"]), tmp_path / "run")
    net = ctx.checkpoint_model()
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.add_(3.0)   # stale statistics: every channel shifted
    stale = [b.running_mean.clone() for b in net.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    rng = torch.get_rng_state()
    row = ctx.record_init("quantize/init", net)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b.running_mean) for a, b in
               zip(stale, (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))))
    assert row["val_top1"] < base["val_top1"] - 10
    assert abs(row["val_top1_bn_reestimated"] - base["val_top1"]) <= CLOSE
