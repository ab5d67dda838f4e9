"""The README's set-up commands, CI and the documentation stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    """The commands of the README's first ``bash`` block, by their ``# N.`` comment."""
    text = (ROOT / "README.rst").read_text(encoding="utf-8")
    block = text.split(".. code-block:: bash", 1)[1].split("\n\n(", 1)[0]
    return dict(re.findall(r"#\s*(\d+)\..*\n\s+(.+)", block))


def test_ci_runs_exactly_the_readme_test_command():
    commands = _readme_commands()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert commands["2"] == ci[-1]
    # the tox environment it runs holds ruff, the tests and the documentation build
    import configparser

    env = commands["2"].rsplit("tox -e ", 1)[1].split()[0]
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    # tox's own substitution, which the check environment uses for the test environment's lines
    run = tox[f"testenv:{env}"]["commands"].replace(
        "{[testenv]commands}", tox["testenv"]["commands"])
    assert all(step in run for step in ("ruff check", "pytest", "sphinx-build -W"))


def test_install_page_gives_the_readme_commands():
    page = (ROOT / "docs" / "install.rst").read_text(encoding="utf-8")
    for command in _readme_commands().values():
        assert command in page
