"""scripts/peak_memory.py: the peak memory of a command and the processes it starts, summed."""
import re
import subprocess
import sys

import pytest

from conftest import REPO

# Each process writes 300 MB into memory of its own and holds it a second, so that a poll sees it.
HOLD = "import time; b = b'x' * 300_000_000; time.sleep(1.0)"


def peak_anon_gb(*command):
    result = subprocess.run([sys.executable, "scripts/peak_memory.py", "--", *command], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return float(re.search(r"peak RssAnon, summed over the processes: ([\d.]+) GB", result.stderr).group(1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_memory_of_a_process_and_of_its_children_is_summed():
    one = peak_anon_gb(sys.executable, "-c", HOLD)
    assert 0.3 <= one < 0.45
    # The command starts two children that hold their 300 MB at once.
    two = peak_anon_gb(sys.executable, "-c",
                       "import subprocess, sys; ps = [subprocess.Popen([sys.executable, '-c', %r]) for _ in range(2)]; "
                       "[p.wait() for p in ps]" % HOLD)
    assert 0.6 <= two < 0.8
