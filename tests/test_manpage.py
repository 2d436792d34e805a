"""
The man page: lint-clean, installed with the package, and complete: every
plugin option, config key, limit, subcommand and x-proxy-error value is in it.
"""

from __future__ import annotations

import importlib.resources
import shutil
import subprocess
from pathlib import Path

import attrs
import pytest

from codex_proxy import cli, config
from codex_proxy.errors import REPLIES
from codex_proxy.tap import Options

PAGE = importlib.resources.files("codex_proxy") / "data" / "codexproxy.1"


@pytest.fixture(scope="module")
def rendered() -> str:
    """
    The page's text with roff escapes for hyphens undone.
    """
    return PAGE.read_text().replace("\\-", "-")


def _plugin_flags() -> list[str]:
    options = Options()
    names = []
    for spec in [*options.optParameters, *getattr(options, "optFlags", [])]:
        long, short = spec[0], spec[1]
        names.append(f"--{long}")
        if short:
            names.append(f"-{short}")
    # Options given as opt_ methods (repeatable ones), minus usage's own.
    for attribute in dir(options):
        if attribute.startswith("opt_") and attribute not in ("opt_help", "opt_version"):
            names.append("--" + attribute[4:].replace("_", "-"))
    return names


def test_the_page_lints_clean():
    if shutil.which("groff") is None:
        pytest.fail("groff is required to lint the man page (make sysdeps)")
    done = subprocess.run(
        ["groff", "-ww", "-man", "-z", str(PAGE)], capture_output=True, text=True
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_checkout_copy_is_the_packaged_page():
    source = Path(__file__).parents[1] / "man" / "codexproxy.1"
    assert source.resolve() == Path(str(PAGE)).resolve()


def _section(page: str, name: str) -> str:
    return page.split(f"\n.SH {name}\n", 1)[1].split("\n.SH ", 1)[0]


@pytest.mark.parametrize("flag", _plugin_flags())
def test_every_plugin_option_is_documented(rendered, flag):
    tagged = [
        line
        for line in _section(rendered, "OPTIONS").splitlines()
        if line.startswith((".BR ", ".BI ", ".B "))
    ]
    assert any(flag in line.split(" ") for line in tagged), tagged


@pytest.mark.parametrize(
    "key", [*config._NETWORK_KEYS, *attrs.fields_dict(config.Limits)]
)
def test_every_config_key_is_documented(rendered, key):
    assert f'\n.BR {key} "' in _section(rendered, "CONFIGURATION")


@pytest.mark.parametrize("header", sorted({reply.header for reply in REPLIES.values()}))
def test_every_error_header_is_documented(rendered, header):
    assert f".B {header}\n" in rendered


@pytest.mark.parametrize(
    "command", sorted(cli._parser()._subparsers._group_actions[0].choices)
)
def test_every_subcommand_is_documented(rendered, command):
    assert f".BR {command} " in rendered


@pytest.mark.parametrize(
    "section",
    ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "CONFIGURATION", "FILES",
     "SIGNALS", "EXIT STATUS", "ENVIRONMENT", "SECURITY", "EXAMPLES", "SEE ALSO"],
)
def test_every_section_the_issue_lists(rendered, section):
    assert f"\n.SH {section}\n" in rendered
