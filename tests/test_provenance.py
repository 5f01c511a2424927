"""The commit written next to every number: '+dirty' for changed code, not for fresh results."""
import subprocess

from tandem.provenance import git_commit


def test_dirty_means_changed_code_not_changed_results(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    clean = git_commit(tmp_path / "src")
    assert len(clean) == 40
    (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"new": 1}\n')
    assert git_commit(tmp_path / "src") == clean            # a benchmark wrote its results
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path / "src") == clean + "+dirty"  # the code changed
