"""A non-editable install must carry the templates inside the package."""

import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_ships_the_templates(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("nftdivert-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"nftdivert/templates/ruleset.nft.j2", "nftdivert/templates/xt-queue.rules.j2",
            "nftdivert/templates/report.html.j2", "nftdivert/report/page.py"} <= names
    assert {"nftdivert/ruleset/backends/xt.py", "nftdivert/worker/fixup.py", "nftdivert/services/listeners.py", "nftdivert/lab/sandbox.py"} <= names
