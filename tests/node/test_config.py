"""Configuration errors name the file, the field and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.node.config import ConfigError, load_config

GOOD = """
node_id = "cam-01"
listen = "127.0.0.1:7000"
seeds = ["127.0.0.1:7001"]
data_dir = "data"
[labels]
site = "berlin"
[tls]
dir = "creds"
[membership]
probe_interval_s = 0.5
probe_timeout_s = 0.2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_good_config_resolves_paths_relative_to_the_file(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.data_dir == tmp_path / "data"
    assert config.tls.dir == tmp_path / "creds"
    assert config.membership.to_core().probe_interval_s == 0.5
    assert config.membership.to_core().indirect_checks == 3  # memberlist default kept


@pytest.mark.parametrize("change, field, words", [
    (('listen = "127.0.0.1:7000"', 'listen = "localhost"'), "listen", "host:port"),
    (('node_id = "cam-01"', 'node_id = "cam 01!"'), "node_id", "pattern"),
    (("probe_timeout_s = 0.2", "probe_timeout_s = 0.9"), "membership", "below probe_interval_s"),
    (("probe_interval_s = 0.5", "probe_interval_s = -1"), "membership.probe_interval_s", "greater than 0"),
    (('site = "berlin"', 'Site = "berlin"'), "labels", "lowercase"),
    (('data_dir = "data"', 'data_dir = "data"\nsurprise = 1'), "surprise", "Extra inputs"),
    (('[tls]\ndir = "creds"', ""), "tls", "required"),
])
def test_errors_name_file_field_and_problem(tmp_path, change, field, words):
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and f"{field}:" in message and words in message, message


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "node_id = "))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")
