"""A user's own CNN, defined here (factory `test_user_model:UserNet`), with a plain `.pt` state
dict: every method through the recipe path and through `tandem.compress`, and the compressed
files reloaded in a fresh process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import tandem
from tandem.cli import main
from tandem.errors import TandemError
from tandem.recipes import dump_recipe, load_recipe

HERE = Path(__file__).parent
FACTORY = "test_user_model:UserNet"
METHODS = ["baseline", "prune", "quantize", "mutual", "independent", "pqkd", "pdd", "picpq", "sbs"]
TINY = ["train.epochs=1", "train.progress=false", "prune.finetune_epochs=1", "mutual.epochs=1", "distill.epochs=1",
        "pdd.epochs=1", "pdd.finetune_epochs=1", "pdd.gate_placement=groups", "picpq.evaluations=3", "picpq.population=2", "picpq.sample=2",
        "picpq.search_steps=2", "picpq.finetune_epochs=1", "picpq.qat_epochs=[1,1]", "sbs.search_epochs=1",
        "sbs.finetune_epochs=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class UserNet(nn.Module):
    """Not built by tandem: a stem, a residual block, a strided conv, a linear head."""

    def __init__(self, num_classes=10, in_channels=3, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.block = Block(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.down(self.block(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Branchy(UserNet):
    def forward(self, x):
        x = self.stem(x)
        if x.mean() > 0:   # data-dependent control flow: torch.fx cannot trace it
            x = self.block(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.down(x), 1), 1))


def _digits():
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = (torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    return x, torch.tensor(digits.target)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A UserNet trained a little by a plain loop (as a user's own script would), as a .pt."""
    torch.manual_seed(0)
    net, (x, y) = UserNet(10, 1), _digits()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(3):
        for i in range(0, 1400, 64):
            opt.zero_grad()
            F.cross_entropy(net(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    path = tmp_path_factory.mktemp("user") / "user.pt"
    torch.save(net.state_dict(), path)
    return path


def _fresh(*args, cwd=HERE) -> subprocess.CompletedProcess:
    """`tandem ...` in a new interpreter, from this folder (where the factory's module is)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tandem.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def _reloads_with_the_recorded_accuracy(out: Path, results: dict) -> None:
    """`tandem eval RUN` in a fresh process rebuilds every file and finds its recorded test top-1."""
    proc = _fresh("eval", str(out))
    assert proc.returncode == 0, proc.stderr
    measured = {line.split(":")[0]: float(line.split("top-1 ")[1].split("%")[0]) for line in proc.stdout.splitlines()}
    for row in (r for r in results["models"] if not r.get("init")):   # start rows write no model file
        assert measured[Path(row["model_file"]).name] == pytest.approx(row["top1"], abs=0.01), row["name"]


def test_every_method_on_a_user_model_from_a_recipe(tmp_path, weights, monkeypatch):
    monkeypatch.chdir(HERE)
    out = tmp_path / "run"
    assert main(["run", f"method=[{','.join(METHODS)}]", f"model.factory={FACTORY}", f"model.checkpoint={weights}",
                 *TINY, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    names = {row["name"] for row in results["models"]}
    for want in ("baseline", "pruned", "mutual/pruned", "independent/quantized", "pqkd/distilled", "pdd/pruned",
                 "picpq/quantized", "sbs/compressed"):
        assert want in names
    pruned = next(r for r in results["models"] if r["name"] == "pqkd/distilled")
    assert pruned["macs"] < results["models"][0]["macs"] and pruned["w_bits"] < 32
    _reloads_with_the_recorded_accuracy(out, results)
    proc = _fresh("profile", str(out / pruned["model_file"]), "--json")
    assert proc.returncode == 0, proc.stderr
    profile = json.loads(proc.stdout)
    assert profile["macs"] == pruned["macs"] and profile["bops"] == pruned["bops"]
    proc = _fresh("export", str(out / pruned["model_file"]), "--format", "onnx", "--out", str(tmp_path / "onnx"))
    assert proc.returncode == 0 and "same prediction on 100.00%" in proc.stdout, proc.stdout + proc.stderr
    assert results["models"][0]["top1"] > 80   # the user's trained weights were loaded (untrained: about 10%)
    recorded = (out / "recipe.yaml").read_text()
    assert f"factory: {FACTORY}" in recorded and "checkpoint:" in recorded


def test_every_method_on_a_model_object_from_python(tmp_path):
    x, y = _digits()
    torch.manual_seed(0)
    net = UserNet(10, 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TandemError, match="the labels go up to 9 but the model has 5 outputs"):
        tandem.compress(UserNet(5, 1), "quantize", train=TensorDataset(x, y), test=TensorDataset(x, y),
                        out=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    result = tandem.compress(net, METHODS, train=TensorDataset(x[:1400], y[:1400]), test=TensorDataset(x[1400:], y[1400:]),
                             schedule={"epochs": 1, "progress": False}, out=tmp_path / "run",
                             overrides=[o for o in TINY if not o.startswith("train.")])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())   # the user's model is untouched
    assert {row["name"] for row in result.results["models"] if not row.get("init")} == set(result.models)
    distilled = result.models["pqkd/distilled"]
    assert isinstance(distilled, UserNet) and distilled.stem[0].out_channels < 8
    with torch.no_grad():
        agree = (distilled.eval()(x[1400:]).argmax(1) == y[1400:]).float().mean().item() * 100
    assert agree == pytest.approx(result.rows["pqkd/distilled"]["top1"], abs=0.01)
    assert result.results["test_images"] == 397 and result.out == tmp_path / "run"
    # a fresh process rebuilds the files from the class path; `tandem eval` says it cannot load the data
    row = result.rows["sbs/compressed"]
    code = ("from tandem.engine import load_model; import sys; m, meta = load_model(sys.argv[1]); "
            "print(type(m).__name__, meta['input_size'])")
    proc = subprocess.run([sys.executable, "-c", code, str(result.out / row["model_file"])], capture_output=True,
                          text=True, cwd=HERE, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["UserNet", "[1,", "8,", "8]"], proc.stderr
    proc = _fresh("eval", str(result.out / row["model_file"]))
    assert proc.returncode == 2 and "tandem.compress" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = _fresh("profile", str(result.out / row["model_file"]), "--json")   # its recorded input size
    assert proc.returncode == 0 and json.loads(proc.stdout)["bops"] == row["bops"], proc.stderr


def test_state_dicts_in_usual_wrappers_load_and_a_mismatch_is_named(tmp_path, weights, refused, monkeypatch):
    monkeypatch.chdir(HERE)
    state = torch.load(weights, weights_only=True)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    recipe = load_recipe(None, ["method=baseline", f"model.factory={FACTORY}", f"model.checkpoint={tmp_path / 'ddp.pth'}"])
    from tandem.runner import RunContext
    net = RunContext(recipe, tmp_path / "unused").checkpoint_model()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    torch.save(UserNet(10, 1, width=16).state_dict(), tmp_path / "wide.pt")
    torch.save({"stem.0.weight": state["stem.0.weight"]}, tmp_path / "partial.pt")
    base = ["method=baseline", f"model.factory={FACTORY}", "train.progress=false"]
    refused(base, [
        ([f"model.checkpoint={tmp_path / 'wide.pt'}"],
         "shape differs 21: stem.0.weight (file (16, 1, 3, 3), model (8, 1, 3, 3))"),
        ([f"model.checkpoint={tmp_path / 'partial.pt'}"], "missing 25: stem.1.weight"),
        (["model.factory=no_such_module:Net"], "cannot import 'no_such_module'"),
        (["model.factory=test_user_model:Nothing"], "has no 'Nothing'"),
        (["model.name=resnet20"], "both given"),
    ])


def test_an_untraceable_user_model_names_its_module_and_line(tmp_path, refused, monkeypatch):
    monkeypatch.chdir(HERE)
    refused(["method=prune", "model.factory=test_user_model:Branchy", "train.epochs=1", "train.progress=false"],
            [([], "the forward of Branchy, at test_user_model.py")])
    with pytest.raises(TandemError, match=r"cannot trace Branchy.*if x.mean\(\) > 0"):
        tandem.prune(Branchy(10, 1), torch.zeros(1, 1, 8, 8), "l1", ratio=0.5)


def test_recipe_records_every_section_its_methods_read_and_refuses_the_rest(refused):
    text = dump_recipe(load_recipe(None, ["method=quantize"]))
    assert "quant:\n  method: lsq\n" in text and "w_bits: 2" in text and "\nprune:" not in text
    text = dump_recipe(load_recipe(None, ["method=sbs"]))
    assert "sbs:\n  bits:\n  - 2\n  - 4\n  - 8\n" in text and "\nquant:" not in text
    refused(["method=baseline", "train.epochs=1"], [(["prune.finetune_epochs=1"], "prune: no method of this recipe "
                                                                                  "(baseline) reads it")])


NET_SOURCE = '''
import torch, torch.nn as nn, tandem
from torch.utils.data import TensorDataset
from sklearn.datasets import load_digits

class Net(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))

def main(out):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    tandem.compress(Net(), "quantize", train=TensorDataset(x[:1400], y[:1400]), test=TensorDataset(x[1400:], y[1400:]),
                    schedule={"epochs": 1, "progress": False}, quant={"epochs": 1}, report={"latency": False}, out=out)

if __name__ == "__main__":
    import sys
    main(sys.argv[1])
'''


def _python(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_files_written_from_a_script_say_how_to_reopen_them_and_take_factory(tmp_path):
    """The README's snippet run as a script records its class as '__main__:Net': the run says so
    in one line, and --factory reopens the files; run with `python -m` it records the module."""
    (tmp_path / "myscript.py").write_text(NET_SOURCE)
    done = _python(["myscript.py", "run1"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    warning = [ln for ln in done.stderr.splitlines() if "tandem: warning: Net is defined in the script" in ln]
    assert len(warning) == 1 and "--factory MODULE:Net" in warning[0]
    model_file = next((tmp_path / "run1" / "models").glob("lsq-*.safetensors"))
    for command in ("profile", "eval", "export"):
        failed = _python(["-m", "tandem.cli", command, str(model_file)], tmp_path)
        assert failed.returncode != 0 and "'__main__:Net'" in failed.stderr, (command, failed.stderr[-500:])
    ok = _python(["-m", "tandem.cli", "profile", str(model_file), "--factory", "myscript:Net"], tmp_path)
    assert ok.returncode == 0 and "MACs" in ok.stdout, ok.stderr[-2000:]
    for command in ("eval", "export"):   # the model rebuilds; compress's in-memory data is Python's to evaluate
        later = _python(["-m", "tandem.cli", command, str(model_file), "--factory", "myscript:Net"], tmp_path)
        assert "__main__" not in later.stderr and "in-memory" in later.stderr, (command, later.stderr[-500:])
    refused = _python(["-m", "tandem.cli", "profile", "resnet20", "--factory", "myscript:Net"], tmp_path)
    assert refused.returncode != 0 and "--factory applies to a model file" in refused.stderr

    done = _python(["-m", "myscript", "run2"], tmp_path)            # the same file as a module
    assert done.returncode == 0 and "tandem: warning" not in done.stderr, done.stderr[-2000:]
    model_file = next((tmp_path / "run2" / "models").glob("lsq-*.safetensors"))
    ok = _python(["-m", "tandem.cli", "profile", str(model_file)], tmp_path)
    assert ok.returncode == 0 and "MACs" in ok.stdout, ok.stderr[-2000:]
