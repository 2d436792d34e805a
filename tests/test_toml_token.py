"""
Bearer tokens in config tables (client and operations tokens): inline or
from a file, with the file and length checks, and never in a message.
"""

from __future__ import annotations

import os

import pytest

from codex_proxy._toml import ConfigError, Table

TOKEN = "s3cr3t-token-0123456789"


def table(**values: object) -> Table:
    return Table(values, "cfg.toml", "network")


def test_absent_is_none():
    assert table().token("admin_token", "admin_token_file") is None


def test_inline_token():
    assert table(admin_token=TOKEN).token("admin_token", "admin_token_file") == TOKEN


def test_file_token_without_its_newline(tmp_path):
    path = tmp_path / "t"
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o600)
    found = table(admin_token_file=str(path)).token("admin_token", "admin_token_file")
    assert found == TOKEN


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_file_readable_by_others_is_refused(tmp_path, mode):
    path = tmp_path / "t"
    path.write_text(TOKEN)
    os.chmod(path, mode)
    with pytest.raises(ConfigError) as e:
        table(admin_token_file=str(path)).token("admin_token", "admin_token_file")
    assert "network.admin_token_file" in str(e.value) and "chmod 600" in str(e.value)
    assert TOKEN not in str(e.value)


def test_symlink_and_missing_file_are_refused(tmp_path):
    path = tmp_path / "t"
    path.write_text(TOKEN)
    os.chmod(path, 0o600)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match="symlink"):
        table(admin_token_file=str(link)).token("admin_token", "admin_token_file")
    with pytest.raises(ConfigError, match="cannot read"):
        table(admin_token_file=str(tmp_path / "none")).token("admin_token", "admin_token_file")


def test_short_token_and_both_keys_are_refused():
    with pytest.raises(ConfigError) as e:
        table(admin_token="short-secret").token("admin_token", "admin_token_file")
    assert "at least 16" in str(e.value) and "short-secret" not in str(e.value)
    with pytest.raises(ConfigError, match="not both"):
        table(admin_token=TOKEN, admin_token_file="/x").token("admin_token", "admin_token_file")
