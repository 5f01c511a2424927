"""A run killed with SIGKILL (or stopped with Ctrl-C) resumes to the same result."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

# ~1 s per epoch on 2 cores: slow enough to be killed in the middle of one
ARGS = ["method=baseline", "train.epochs=5", "train.batch_size=8", "train.progress=false"]


PROCS = []


def tandem(*args):
    # one thread: a tiny net is fastest that way, and it keeps the timing sane on a loaded machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "tandem.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    PROCS.append(p)
    return p


@pytest.fixture(autouse=True)
def no_leftover_processes():
    yield
    while PROCS:
        p = PROCS.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


def wait_for_epochs(run_dir, n, proc, timeout=600):
    metrics, ckpt = run_dir / "metrics.jsonl", run_dir / "stages" / "baseline" / "last.ckpt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n and ckpt.exists():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("run made no progress")


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    p = tandem("run", *ARGS, "--out", str(clean))
    assert p.wait(timeout=300) == 0, p.communicate()

    p = tandem("run", *ARGS, "--out", str(killed))
    wait_for_epochs(killed, 2, p)
    time.sleep(0.4)                                   # into epoch 3
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "results.json").exists()

    p = tandem("run", "--resume", "--out", str(killed))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    a = json.loads((clean / "results.json").read_text())["models"][0]
    b = json.loads((killed / "results.json").read_text())["models"][0]
    assert (a["top1"], a["val_top1"]) == (b["top1"], b["val_top1"])
    wa = load_file(clean / "models" / "baseline.safetensors")
    wb = load_file(killed / "models" / "baseline.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)   # bit for bit on CPU
    epochs = [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-3:] == [3, 4, 5] and epochs.count(1) == 1


def test_ctrl_c_leaves_a_resumable_run_and_says_how(tmp_path):
    run_dir = tmp_path / "run"
    p = tandem("run", *ARGS, "--out", str(run_dir))
    wait_for_epochs(run_dir, 1, p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert f"tandem run --resume --out {run_dir}" in err and "Traceback" not in err
    p = tandem("run", "--resume", "--out", str(run_dir))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert json.loads((run_dir / "results.json").read_text())["models"][0]["top1"] > 80
