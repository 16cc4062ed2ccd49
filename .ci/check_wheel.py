"""CI: the built wheel and sdist carry LICENSE (and the wheel py.typed), the wheel no
benchmark harness (``benchmarks/`` stays in the repository), and the installed
``nllloss --version`` prints the version written in ``src/nllloss/__init__.py``.

Usage: ``python .ci/check_wheel.py DIST_DIR`` after ``pip wheel``/``build`` wrote there and
the wheel was installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(dist: Path) -> int:
    version = re.search(
        r'^__version__ = "([^"]+)"', (ROOT / "src/nllloss/__init__.py").read_text(), re.M
    )[1]
    (wheel,) = dist.glob(f"nllloss-{version}-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    problems = []
    if f"nllloss-{version}.dist-info/licenses/LICENSE" not in names:
        problems.append(f"{wheel.name} holds no LICENSE")
    if "nllloss/py.typed" not in names:
        problems.append(f"{wheel.name} holds no nllloss/py.typed")
    benchmark = [name for name in names if "bench" in name or "harness" in name]
    if benchmark:
        problems.append(f"{wheel.name} holds the benchmark: {', '.join(benchmark)}")
    for sdist in dist.glob(f"nllloss-{version}.tar.gz"):
        if f"nllloss-{version}/LICENSE" not in tarfile.open(sdist).getnames():
            problems.append(f"{sdist.name} holds no LICENSE")
    printed = subprocess.run(
        ["nllloss", "--version"], capture_output=True, text=True, check=False
    ).stdout
    if printed != f"nllloss {version}\n":
        problems.append(f"nllloss --version printed {printed!r}, not 'nllloss {version}'")
    for problem in problems:
        print(f"check_wheel: {problem}", file=sys.stderr)
    if not problems:
        print(
            f"check_wheel: {wheel.name} holds LICENSE and py.typed, no benchmark; "
            f"--version says {version}"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
