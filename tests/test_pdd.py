"""PDD: its objective against methods.md §3.3, the MACs budget penalty, inheritance, a run end to
end with its controls, resume after SIGKILL, and bad input refused before a run folder exists."""
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
from tandem.engine import save_model
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
    assert set(rows) == {"pdd/teacher", "pdd/kd", "pdd/pruned", "pdd/l1-control", "pdd/student"}
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
