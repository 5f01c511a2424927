"""PDD: its objective against methods.md §3.3, the MACs budget penalty, inheritance, a run end to
end with its controls, the paper's per-block gates on a ResNet (pruned and L1 control at the
gates' widths, a start equal to the baseline), resume after SIGKILL, and bad input refused before
a run folder exists."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem import cost
from tandem.cli import main
from tandem.engine import load_model, save_model
from tandem.methods.pdd import PddSpec, _reinit, pdd_objective
from tandem.models import create_model
from tandem.prune.gates import gate_
from tandem.recipes import load_recipe

TINY = ["method=pdd", "pdd.teacher=small_cnn", "train.epochs=1", "pdd.epochs=2", "pdd.finetune_epochs=1",
        "train.progress=false"]


def test_objective_is_alpha_ce_plus_hinton_kd_or_the_codes_ce_only():
    torch.manual_seed(0)
    z = {name: torch.randn(8, 5) for name in ("pdd", "kd", "student", "teacher")}
    y = torch.randint(0, 5, (8,))
    losses = pdd_objective(PddSpec(alpha=0.6, temperature=3.0), "pdd")(z, y, None)
    kl = F.kl_div(F.log_softmax(z["pdd"] / 3, 1), F.softmax(z["teacher"] / 3, 1), reduction="batchmean")
    torch.testing.assert_close(losses["ce/pdd"] + losses["kd/pdd"], 0.6 * F.cross_entropy(z["pdd"], y) + 0.4 * 9 * kl)
    assert set(losses) == {"ce/pdd", "kd/pdd", "ce/kd", "kd/kd", "ce/student"}
    torch.testing.assert_close(losses["ce/student"], F.cross_entropy(z["student"], y))    # alone: plain CE
    code = pdd_objective(PddSpec(kd_mode="ce_only", controls=["student", "l1"]), "pdd")(z, y, None)
    torch.testing.assert_close(code["ce/pdd"], 0.6 * F.cross_entropy(z["pdd"], y))
    assert not any(k.startswith("kd/") for k in code)


def test_macs_penalty_acts_only_above_the_target_and_reaches_the_gates():
    net = create_model("small_cnn", in_channels=1)
    gates = gate_(net, torch.zeros(1, 1, 8, 8), "sign")
    with torch.no_grad():
        for g in gates.gates.values():
            g.m.fill_(0.5)                       # all open: MACs = full
    full = gates.macs().item()
    z = {"pdd": torch.randn(4, 10), "teacher": torch.randn(4, 10)}
    y = torch.zeros(4, dtype=torch.long)
    for target, positive in ((0.5, True), (1.0, False)):
        objective = pdd_objective(PddSpec(macs_target=target, controls=[]), "pdd", gates, full)
        penalty = objective(z, y, None)["macs/pdd"]
        assert (penalty.item() > 0) == positive
        if positive:
            torch.testing.assert_close(penalty, torch.log(torch.tensor(1 / target)))
            penalty.backward()
            assert all(g.m.grad is not None and (g.m.grad > 0).all() for g in gates.gates.values())


def test_reinit_resets_bn_and_linear_but_keeps_conv_weights():
    net = create_model("small_cnn", in_channels=1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    conv = [m.weight.clone() for m in net.modules() if isinstance(m, nn.Conv2d)]
    _reinit(net)
    assert all(torch.equal(a, m.weight) for a, m in zip(conv, [m for m in net.modules() if isinstance(m, nn.Conv2d)]))
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_pdd_runs_end_to_end_with_controls(tmp_path, capsys, one_thread):
    assert main(["run", *TINY, "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {r["name"]: r for r in results["models"]}
    assert set(rows) == {"pdd/init", "pdd/teacher", "pdd/kd", "pdd/pruned", "pdd/l1-control", "pdd/student"}
    assert rows["pdd/init"]["init"] and rows["pdd/init"]["macs"] == rows["pdd/kd"]["macs"]
    student = cost.profile(create_model("small_cnn", in_channels=1), (1, 8, 8))
    pruned = rows["pdd/pruned"]
    assert pruned["control"] == "pdd/l1-control" and pruned["macs"] < student.macs
    assert pruned["macs_reduction"] == pytest.approx(1 - pruned["macs"] / student.macs)
    assert pruned["params_reduction"] == pytest.approx(1 - pruned["params"] / student.params)
    assert rows["pdd/l1-control"]["macs"] == pruned["macs"]          # pruned to PDD's widths
    assert rows["pdd/kd"]["macs"] == rows["pdd/student"]["macs"] == student.macs
    assert sum(pruned["kept"].values()) < 16 + 32 + 64
    recipe = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "pdd:" in recipe and "teacher:" in recipe and "kd_mode: hinton" in recipe
    assert "gate_placement: paper" in recipe and "gate_init: open" in recipe


def _tandem(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tandem.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_pdd_resumes_after_sigkill_to_the_uninterrupted_result(tmp_path):
    args = [*TINY, "pdd.epochs=6", "train.batch_size=16"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    p = _tandem("run", *args, "--out", str(clean))
    assert p.wait(timeout=600) == 0, p.communicate()
    p = _tandem("run", *args, "--out", str(killed))
    ckpt = killed / "stages" / "pdd-distill" / "last.ckpt"
    deadline = time.time() + 600
    try:
        while not ckpt.exists():                     # killed in the gated distillation stage
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.02)
        time.sleep(0.3)
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    assert not (killed / "results.json").exists()
    p = _tandem("run", "--resume", "--out", str(killed))
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    a = {r["name"]: r for r in json.loads((clean / "results.json").read_text())["models"]}
    b = {r["name"]: r for r in json.loads((killed / "results.json").read_text())["models"]}
    assert {k: (r["top1"], r["macs"], r.get("kept")) for k, r in a.items()} == \
        {k: (r["top1"], r["macs"], r.get("kept")) for k, r in b.items()}


def test_bad_input_is_one_line_and_leaves_no_run_folder(tmp_path, refused):
    teacher = create_model("small_cnn", num_classes=3, in_channels=1)
    save_model(teacher, tmp_path / "t3.safetensors")
    cases = [
        ([f"pdd.teacher_checkpoint={tmp_path / 't3.safetensors'}"], "the teacher has num_classes = 3"),
        (["pdd.macs_target=1.5"], "pdd.macs_target = 1.5"),
        (["pdd.macs_target=0"], "pdd.macs_target = 0"),
        (["pdd.macs_weight=2"], "set macs_target too"),
        (["pdd.kd_mode=ce_only", "pdd.controls=[student]"], "ce_only trains without a teacher, so pdd.teacher"),
        (["pdd.teacher=nonet"], "unknown model"),
    ]
    refused(TINY, cases)


class _Untraceable(nn.Module):
    def __init__(self, num_classes, in_channels, widths):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:                       # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.fc(x.mean((2, 3)))


def test_a_student_the_channel_graph_cannot_trace_is_refused_before_the_run(tmp_path):
    from tandem.models.registry import MODELS, register_model
    from tandem.errors import TandemError
    from tandem.runner import run
    register_model("untraceable_test_net")(lambda num_classes, in_channels, widths: _Untraceable(
        num_classes, in_channels, widths))
    try:
        recipe = load_recipe(None, ["method=pdd", "model.name=untraceable_test_net", "pdd.kd_mode=ce_only",
                                    "pdd.controls=[student]"])
        with pytest.raises(TandemError, match="pdd: the student model 'untraceable_test_net'.*cannot trace"):
            run(recipe, tmp_path / "run")
        assert not (tmp_path / "run").exists()
    finally:
        MODELS.unregister("untraceable_test_net")


RESNET = ["method=pdd", "model.name=resnet20", f"model.widths=[{','.join(['4'] * 7 + ['8'] * 6 + ['16'] * 6)}]",
          "train.epochs=1", "pdd.epochs=1", "pdd.finetune_epochs=1", "train.progress=false"]


def test_paper_placement_prunes_resnet20_per_block_from_a_start_equal_to_the_baseline(tmp_path, one_thread):
    from tandem.runner import execute
    recipe = load_recipe(None, [*RESNET, "pdd.student_init=pretrained", "pdd.macs_target=0.5"])
    results, ctx = execute(recipe, tmp_path / "run")
    rows = {r["name"]: r for r in results["models"]}
    init, base = rows["pdd/init"], rows["baseline"]
    assert init["init"] and init["stage"] == "pdd-distill" and init["macs"] == base["macs"]
    assert (init["top1"], init["val_top1"]) == (base["top1"], base["val_top1"])   # open gates: the same network
    kept = rows["pdd/pruned"]["kept"]
    assert list(kept) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]   # one gate per block, no stem
    pruned = ctx.models["pdd/pruned"]
    widths = [4] + [k for k in kept.values() for _ in range(2)]                    # conv1 = conv2 = count_b
    assert pruned.config["widths"] == widths and widths != recipe.model.widths     # the budget closed some
    assert ctx.models["pdd/l1-control"].config["widths"] == widths
    assert rows["pdd/l1-control"]["macs"] == rows["pdd/pruned"]["macs"] < base["macs"]
    x = torch.randn(3, 1, 8, 8)
    again = load_model(tmp_path / "run" / rows["pdd/pruned"]["model_file"])[0].eval()
    torch.testing.assert_close(again(x), pruned.eval()(x))                          # a built-in model file


class _UserResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv(x))


class _UserResNet(nn.Module):
    """A residual network that is not built from tandem's blocks."""

    def __init__(self, num_classes, in_channels, widths):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.block = _UserResBlock(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.block(F.relu(self.stem(x))).mean((2, 3)))


def test_paper_placement_refuses_a_residual_model_without_tandem_blocks(tmp_path, refused, one_thread):
    from tandem.models.registry import MODELS, register_model
    register_model("user_resnet_test_net")(_UserResNet)
    try:
        base = ["method=pdd", "model.name=user_resnet_test_net", "pdd.kd_mode=ce_only", "pdd.controls=[student]",
                "pdd.epochs=1", "pdd.finetune_epochs=0", "train.progress=false"]
        refused(base, [([], "the student 'user_resnet_test_net' has residual streams (stem, block.conv are added) "
                            "but is not built from tandem's blocks: set pdd.gate_placement: groups")])
        assert main(["run", *base, "pdd.gate_placement=groups", "--out", str(tmp_path / "groups")]) == 0
    finally:
        MODELS.unregister("user_resnet_test_net")
    uneven = [16, 8, 16] + [16] * 4 + [32] * 6 + [64] * 6                          # layer1.0: conv1 8, conv2 16
    refused([*RESNET, f"model.widths={uneven}".replace(" ", "")],
            [([], "layer1.0 has 8 and 16; or set pdd.gate_placement: groups")])
