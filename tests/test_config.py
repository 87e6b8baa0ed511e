"""Settings: read from the environment, every one documented in the README from its help text."""

import re

import pytest

from prerec.__main__ import main
from prerec.config import SETTINGS, SettingError, Settings, settings_table, with_settings_table
from tests.conftest import ROOT


def test_readme_settings_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert with_settings_table(readme) == readme, "README's settings table is stale: run `make docs`"
    documented = re.findall(r"^\| `(PREREC_[A-Z0-9_]+)` \|", readme, flags=re.MULTILINE)
    assert documented == [setting.env for setting in SETTINGS]


def test_settings_command_rewrites_only_the_table(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n| variable | default | meaning |\n|---|---|---|\n| `PREREC_OLD` | 1 | Gone. |\n\nAfter.\n"
    )
    assert main(["settings", "--readme", str(readme)]) == 0
    assert readme.read_text() == f"# x\n\n{settings_table()}\nAfter.\n"
    assert main(["settings"]) == 0
    assert capsys.readouterr().out == settings_table()
    with pytest.raises(ValueError, match="no settings table"):
        with_settings_table("# no table\n")


def test_defaults_match_the_contract() -> None:
    settings = Settings.from_env({})
    assert (settings.host, settings.port) == ("0.0.0.0", 10600)
    assert settings.database_url is None
    assert settings.blob_dir.as_posix() == "data/blobs"
    assert settings.max_upload_bytes == 2 * 1024**3
    assert settings.sse_ping_seconds == 15
    assert settings.tmp_max_age_seconds == 3600
    assert settings.log_level == "INFO"
    # Idle and slow connections are cut as nginx cuts them (client_header_timeout 60 s,
    # keepalive_timeout 75 s), and the cap follows the open file limit unless set.
    assert settings.header_timeout_seconds <= 60 and settings.keepalive_timeout_seconds <= 75
    assert settings.max_connections is None and settings.cors_origins is None


def test_storage_dir_overrides_data_dir() -> None:
    settings = Settings.from_env({"PREREC_DATA_DIR": "/srv/x", "PREREC_STORAGE_DIR": "/mnt/blobs"})
    assert settings.blob_dir.as_posix() == "/mnt/blobs"


@pytest.mark.parametrize(
    ("env", "value"),
    [("PREREC_PORT", "http"), ("PREREC_PORT", "70000"), ("PREREC_MAX_UPLOAD_BYTES", "0"), ("PREREC_LOG_LEVEL", "loud")],
)
def test_bad_value_names_the_variable(env: str, value: str) -> None:
    with pytest.raises(SettingError, match=env):
        Settings.from_env({env: value})


def test_an_empty_variable_means_the_default() -> None:
    assert Settings.from_env({"PREREC_PORT": ""}).port == 10600
