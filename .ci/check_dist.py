"""Check what `python -m build` wrote (make package-check): one sdist and one wheel of this version, the wheel with
both packages, py.typed, the `sqsd` command and the license and no tests; the sdist with everything the wheel is
built from, the license, README, changelog and the whole test suite. Standard library only.

usage: python .ci/check_dist.py DIST_DIR"""

from __future__ import annotations

import re
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sqsd_callback", "sqsd_lab")


def version() -> str:
    """sqsd_callback.__version__, read without importing the package (its import needs torch)."""
    text = (ROOT / "sqsd_callback" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M)[1]


def sources() -> set[str]:
    """The packages' files as the wheel should hold them (what setuptools finds: .py files, py.typed and the lab's
    evidence data)."""
    return {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".typed", ".json", ".jsonl")}


def check(dist: Path) -> list[str]:
    v = version()
    problems: list[str] = []
    names = sorted(p.name for p in dist.iterdir())
    wheel, sdist = f"sqsd_callback-{v}-py3-none-any.whl", f"sqsd_callback-{v}.tar.gz"
    if names != sorted([wheel, sdist]):
        return [f"{dist} holds {names}, expected {wheel} and {sdist}"]

    with zipfile.ZipFile(dist / wheel) as z:
        files = set(z.namelist())
        info = f"sqsd_callback-{v}.dist-info"
        meta = Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    package_files = {f for f in files if not f.startswith(f"{info}/")}
    if package_files != sources():
        problems.append(f"wheel: package files differ from the source tree: missing "
                        f"{sorted(sources() - package_files)}, extra {sorted(package_files - sources())}")
    if "sqsd_callback/py.typed" not in files:
        problems.append("wheel: no sqsd_callback/py.typed")
    if f"{info}/licenses/LICENSE" not in files:
        problems.append("wheel: no licenses/LICENSE in the dist-info")
    tops = {f.split("/")[0] for f in files}
    if tops != {*PACKAGES, info}:
        problems.append(f"wheel: top-level entries {sorted(tops)} (tests or other folders must stay out)")
    if not re.search(r"^sqsd = sqsd_lab\.cli:main$", entry_points, re.M):
        problems.append("wheel: no `sqsd = sqsd_lab.cli:main` console script")
    expected = {"Name": "sqsd-callback", "Version": v, "License-Expression": "Apache-2.0", "Requires-Python": ">=3.10"}
    for key, want in expected.items():
        if meta.get(key) != want:
            problems.append(f"wheel METADATA: {key} is {meta.get(key)!r}, expected {want!r}")
    extras = set(meta.get_all("Provides-Extra") or [])
    if not {"app", "wandb", "axolotl", "test", "docs"} <= extras:
        problems.append(f"wheel METADATA: extras {sorted(extras)} lack app, wandb, axolotl, test or docs")
    if not meta.get_payload().lstrip().startswith("# sqsd_callback"):
        problems.append("wheel METADATA: the long description is not README.md")

    with tarfile.open(dist / sdist) as t:
        prefix = f"sqsd_callback-{v}/"
        members = {m.name.removeprefix(prefix) for m in t.getmembers() if m.isfile()}
    tests = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("*.py") if "__pycache__" not in p.parts}
    needed = sources() | tests | {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "setup.cfg", "PKG-INFO"}
    if needed - members:
        problems.append(f"sdist: missing {sorted(needed - members)}")
    if any("__pycache__" in m or m.endswith(".pyc") for m in members):
        problems.append("sdist: holds compiled files")

    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## \[([^\]]+)\]", changelog, re.M)
    if not releases or releases[0] != v:
        problems.append(f"CHANGELOG.md: the newest entry is {releases[:1]}, not [{v}] (sqsd_callback.__version__)")
    return problems


if __name__ == "__main__":
    found = check(Path(sys.argv[1]))
    for line in found:
        print(f"check_dist: {line}", file=sys.stderr)
    if not found:
        print(f"check_dist: {sys.argv[1]}: sdist and wheel of {version()} hold what they should")
    sys.exit(1 if found else 0)
