import json
import subprocess
import sys

import pytest

from tandem.cli import main


def test_default_job_runs_every_joint_method_on_one_baseline(tmp_path):
    from tandem.recipes import DEFAULT_JOB

    out = tmp_path / "run"
    assert main(["run", "train.epochs=2", "train.progress=false", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["models"]}
    assert results["methods"] == DEFAULT_JOB == ["independent", "mutual", "pqkd"]
    assert [n for n in rows if not rows[n].get("init")] == [
        "baseline", "independent/pruned", "independent/quantized", "mutual/pruned", "mutual/quantized",
        "pqkd/pruned", "pqkd/quantized", "pqkd/distilled", "pqkd/no-kd"]
    assert [n for n in rows if rows[n].get("init")] == ["independent/init-pruned", "independent/init-quantized",
                                                        "mutual/init-pruned", "mutual/init-quantized", "pqkd/init"]
    base = rows["baseline"]
    for name, row in rows.items():
        if name.endswith("pruned"):
            assert row["macs"] < 0.6 * base["macs"] and row["w_bits"] == 32
        if name.endswith(("quantized", "distilled", "no-kd")):
            assert row["bops"] < 0.1 * base["bops"]
    assert not any("gain_over_independent" in rows[n] for n in rows if rows[n].get("init"))
    for peer in ("pruned", "quantized"):
        assert rows[f"mutual/{peer}"]["gain_over_independent"] == pytest.approx(
            rows[f"mutual/{peer}"]["top1"] - rows[f"independent/{peer}"]["top1"])
    assert rows["pqkd/distilled"]["gain_over_no_kd"] == pytest.approx(
        rows["pqkd/distilled"]["top1"] - rows["pqkd/no-kd"]["top1"])
    report = (out / "report.md").read_text()
    assert all(f"| {name} |" in report for name in rows)
    assert (out / "accuracy_vs_cost.png").stat().st_size > 1000


def test_baseline_end_to_end_and_eval(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    # the commit is read before training (the tree may change while a run trains)
    monkeypatch.setattr("tandem.runner.git_commit", lambda: "after" if (out / "models").exists() else "before")
    assert main(["run", "method=baseline", "train.epochs=2", "train.progress=false", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    (row,) = results["models"]
    for key in ("name", "top1", "val_top1", "params", "macs", "bops", "bytes", "w_bits", "a_bits"):
        assert key in row
    assert row["top1"] > 50 and row["macs"] > 0 and row["bops"] == row["macs"] * 32 * 32
    assert results["recipe"]["train"]["epochs"] == 2 and results["commit"] == "before" and results["wall_time_s"] > 0
    assert all(len(results["load_average_1_5_15min"][k]) == 3 for k in ("start", "end"))
    assert "| baseline |" in (out / "report.md").read_text()
    assert (out / "accuracy_vs_cost.png").stat().st_size > 1000
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    capsys.readouterr()

    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"test top-1 {row['top1']:.2f}%" in printed

    # resuming a finished run retrains nothing and reproduces the same numbers
    assert main(["run", "--resume", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())["models"][0]
    assert again["top1"] == row["top1"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert main(["run", "train.epochs=1", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "{}"


def test_bad_recipe_is_one_line_exit_2_and_no_folder(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", "run", "train.epochs=-3", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train.epochs = -3" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_missing_data_names_the_file_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "never"
    (tmp_path / "nodata").mkdir()
    code = main(["run", "dataset=mnist", f"dataset.root={tmp_path / 'nodata'}", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "train-images-idx3-ubyte" in err and str(tmp_path / "nodata") in err
    assert not out.exists()


def test_profile_json(capsys):
    assert main(["profile", "resnet56", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["macs"] == pytest.approx(125.49e6, abs=0.01e6)
    assert report["bops"] == report["macs"] * 1024
    assert len(report["layers"]) == 56


def test_profile_table_and_list(capsys):
    assert main(["profile", "small_cnn", "--input-size", "8", "--in-channels", "1"]) == 0
    assert "total" in capsys.readouterr().out.lower()
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "resnet56" in listed and "digits" in listed and "baseline" in listed
    (recipes,) = [line for line in listed.splitlines() if line.startswith("recipes: ")]
    assert "digits-qat" in recipes.split(": ")[1].split(", ")


def test_resume_refuses_changed_settings_and_wall_time_sums_invocations(tmp_path, capsys):
    import os
    import stat
    out = tmp_path / "run"
    args = ["method=baseline", "train.epochs=1", "train.progress=false"]
    before = os.umask(0o022)
    try:
        assert main(["run", *args, "--out", str(out)]) == 0
    finally:
        os.umask(before)
    first = json.loads((out / "results.json").read_text())
    recipe_before = (out / "recipe.yaml").read_text()
    assert main(["run", "--resume", "--out", str(out), "train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.epochs" in err and "new run" in err
    assert (out / "recipe.yaml").read_text() == recipe_before                    # nothing rewritten
    assert main(["run", "--resume", "--out", str(out)]) == 0
    second = json.loads((out / "results.json").read_text())
    assert second["invocations"] == 2 and first["invocations"] == 1
    assert second["wall_time_s"] > first["wall_time_s"]
    for name in ("recipe.yaml", "models/baseline.safetensors"):   # written under umask 022 by the first run
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def test_a_killed_invocation_counts_up_to_the_last_file_it_wrote(tmp_path):
    """A SIGKILL leaves invocations.json marked running; the next invocation counts the killed
    one's time up to the newest file of the folder and says so."""
    import os
    import time
    out = tmp_path / "run"
    args = ["method=baseline", "train.epochs=1", "train.progress=false"]
    assert main(["run", *args, "--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())
    marked = json.loads((out / "invocations.json").read_text())
    assert "running_since" not in marked and first["killed_invocations"] == 0
    newest = max(p.stat().st_mtime for p in out.rglob("*") if p.is_file() and p.name != "invocations.json")
    marked["running_since"] = newest - 100.0   # as if an invocation had run for 100 s, then been killed
    (out / "invocations.json").write_text(json.dumps(marked))
    os.remove(out / "results.json")
    time.sleep(3.0)   # the gap before a resume is not the killed invocation's time
    began = time.perf_counter()
    assert main(["run", "--resume", "--out", str(out)]) == 0
    resumed = time.perf_counter() - began   # at least this invocation's own recorded time
    second = json.loads((out / "results.json").read_text())
    assert second["invocations"] == 3 and second["killed_invocations"] == 1
    assert first["wall_time_s"] + 100.0 <= second["wall_time_s"] <= first["wall_time_s"] + 100.0 + resumed
    assert "1 killed" in (out / "report.md").read_text()


def test_bundled_recipe_from_any_folder_progress_lines_profile_and_packed_eval(tmp_path, monkeypatch, capsys):
    import torch
    monkeypatch.chdir(tmp_path)   # no recipes/ here: the recipe comes from the package
    before = torch.get_num_threads()
    try:
        assert main(["run", "digits-qat", "train.epochs=1", "quant.epochs=1", "--threads", "1", "--out", "run"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    # stderr is not a terminal here: one plain line per epoch, no progress bar
    assert "\r" not in err and "\x1b[" not in err
    assert [line.split(":")[0] for line in err.splitlines() if " epoch " in line] == \
        ["baseline epoch 1/1", "qat epoch 1/1"]
    assert all("train loss" in line and "val top-1" in line for line in err.splitlines() if " epoch " in line)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["recipe"]["name"] == "digits-qat"
    for row in (r for r in results["models"] if not r.get("init")):   # a model file is profiled at its dataset's size, with its bits
        assert main(["profile", str(tmp_path / "run" / row["model_file"]), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["macs"], report["bops"], report["bytes"]) == (row["macs"], row["bops"], row["bytes"])
    (qat,) = [r for r in results["models"] if r["w_bits"] < 8 and not r.get("init")]

    assert main(["export", "run", "--format", "safetensors"]) == 0
    capsys.readouterr()
    packed = tmp_path / "run" / "export" / f"{qat['name']}.packed.safetensors"
    assert main(["eval", str(packed)]) == 0
    assert f"test top-1 {qat['top1']:.2f}% on" in capsys.readouterr().out
    packed.rename(tmp_path / packed.name)   # away from its run folder: it records its own dataset
    assert main(["eval", packed.name]) == 0
    assert f"test top-1 {qat['top1']:.2f}% on" in capsys.readouterr().out


def test_terminal_keeps_the_progress_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["run", "method=baseline", "train.epochs=1", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "\r" in err and "baseline epoch 1/1: train loss" not in err


def test_version(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"tandem {version('tandem')}\n"


def test_run_refuses_key_and_value_apart_and_bad_threads(refused):
    refused([], [(["train.epochs", "5"], "train.epochs 5: write overrides as key=value, e.g. train.epochs=5"),
                 (["train.epochs"], "write overrides as key=value"),
                 (["nosuch.yaml", "train.epochs=1"], "recipe file nosuch.yaml not found"),
                 (["method=baseline", "--threads", "0"], "--threads 0: must be a whole number >= 1"),
                 (["method=baseline", "--threads", "two"], "--threads two")])


def test_train_threads_sets_torchs_threads_and_must_agree_with_the_option(tmp_path, refused):
    import torch
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["run", "method=baseline", "train.threads=1", "train.epochs=1", "train.progress=false",
                     "--out", str(tmp_path / "run")]) == 0
        assert torch.get_num_threads() == 1
        refused(["method=baseline", "train.threads=1"], [(["--threads", "2"], "--threads 2 and train.threads = 1 disagree")])
    finally:
        torch.set_num_threads(before)
