"""`pip install .` (not editable) gives a working `tandem` that carries its recipes."""
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wheel(tmp_path: Path) -> Path:
    """A wheel built offline from a copy of the sources (the build writes nothing in the checkout)."""
    src = tmp_path / "src-copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", str(src), "-w", str(tmp_path / "dist")], check=True)
    (wheel,) = (tmp_path / "dist").glob("tandem-*.whl")
    return wheel


def test_wheel_carries_the_recipes_and_its_tandem_runs_one_from_any_folder(tmp_path):
    wheel = _wheel(tmp_path)
    shipped = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("tandem/bundled_recipes/")}
    assert shipped == {p.name for p in (ROOT / "recipes").glob("*.yaml")} and "digits-qat.yaml" in shipped

    # a fresh environment with the wheel installed; the dependencies (torch, ...) are this one's,
    # reached by a .pth line, so nothing is downloaded and the checkout's src/ is not on the path
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True)
    where = tmp_path / "elsewhere"
    where.mkdir()
    proc = subprocess.run([venv / "bin" / "tandem", "run", "digits-qat", "train.epochs=1", "quant.epochs=1",
                           "train.progress=false", "--threads", "1", "--out", "run"],
                          cwd=where, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (where / "run" / "results.json").is_file() and "| lsq-w4a4 |" in proc.stdout
    located = subprocess.run([python, "-c", "import tandem; print(tandem.__file__)"], cwd=where,
                             capture_output=True, text=True, check=True).stdout
    assert located.startswith(str(venv)), located   # the installed copy ran, not the checkout
