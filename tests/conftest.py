import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TANDEM_CACHE", str(Path(__file__).resolve().parents[1] / ".data" / "cache"))
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and it does not oversubscribe a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    return SHARED_DATA

# CI explores the same examples every run (a red CI then always means a real regression);
# local runs keep exploring new ones.
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")


@pytest.fixture
def refused(tmp_path, capsys):
    """refused(base, [(extra args, words), ...]): each `tandem run` exits 2 with one line of
    stderr containing `words` and leaves no run folder."""
    from tandem.cli import main

    def check(base: list[str], cases: list[tuple[list[str], str]]) -> None:
        for i, (extra, words) in enumerate(cases):
            out = tmp_path / f"refused{i}"
            assert main(["run", *base, *extra, "--out", str(out)]) == 2, extra
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and words in err, err
            assert not out.exists(), extra
    return check
