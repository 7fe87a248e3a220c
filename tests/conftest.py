import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("SIDA_SHARED_DIR", REPO_ROOT.parent / "shared"))
FIXTURES_DIR = SHARED_DIR / "fixtures"

FIXTURES_MISSING = (f"parity fixtures not found at {FIXTURES_DIR} (they live in ../shared/fixtures beside the repo; "
                    "set SIDA_SHARED_DIR to point elsewhere)")
requires_fixtures = pytest.mark.skipif(not (FIXTURES_DIR / "README.md").exists(), reason=FIXTURES_MISSING)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The suite runs single-threaded: its tiny networks gain nothing from threads, the 2-core CI machine stays free
    for the subprocesses some tests start, and in-process float results match those 1-thread subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fixtures_dir():
    if not (FIXTURES_DIR / "README.md").exists():
        pytest.skip(FIXTURES_MISSING)
    return FIXTURES_DIR


@pytest.fixture
def bounded():
    """Run a hostile-input case within the issue's bounds: 4 GiB of address space above the current use, 20 seconds.

    A bomb that gets through fails the test (MemoryError, TimeoutError) instead of swapping or hanging the machine.
    """
    import resource
    import signal

    def on_alarm(signum, frame):
        raise TimeoutError("the case ran longer than 20 s")

    vm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_kb * 1024 + (4 << 30), hard))
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
