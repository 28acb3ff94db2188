"""Configuration errors name the file, the field and the problem."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.node.config import ConfigError, NodeConfig, load_config
from mesh.node.federation import retry_interval_s

README = Path(__file__).resolve().parents[2] / "README.md"

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


def test_lifeguard_can_be_switched_off_in_the_node_toml_a_local_cluster_writes(tmp_path):
    """The Lifeguard switches reach the membership core from a node.toml, so benches and operators
    can run plain SWIM; `write_node_config` spells booleans the TOML way."""
    from dataclasses import replace

    from mesh.node.local import FAST_TIMINGS, write_node_config

    path = tmp_path / "node.toml"
    write_node_config(path, node_id="cam-01", address="127.0.0.1:7000", seeds=[], site="berlin",
                      tls_dir=tmp_path / "creds", data_dir=tmp_path / "data",
                      timings=replace(FAST_TIMINGS, lifeguard=False, awareness_max_multiplier=3))
    core = load_config(path).membership.to_core()
    assert core.lifeguard is False and core.awareness_max_multiplier == 3
    assert load_config(write(tmp_path, GOOD)).membership.to_core().lifeguard is True


@pytest.mark.parametrize("change, field, words", [
    (('listen = "127.0.0.1:7000"', 'listen = "localhost"'), "listen", "host:port"),
    (('node_id = "cam-01"', 'node_id = "cam 01!"'), "node_id", "pattern"),
    (("probe_timeout_s = 0.2", "probe_timeout_s = 0.9"), "membership", "below probe_interval_s"),
    (("probe_interval_s = 0.5", "probe_interval_s = -1"), "membership.probe_interval_s", "greater than 0"),
    (('site = "berlin"', 'Site = "berlin"'), "labels", "lowercase"),
    (('data_dir = "data"', 'data_dir = "data"\nsurprise = 1'), "surprise", "unknown top-level field"),
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


def test_the_readmes_node_toml_reference_is_a_valid_config(tmp_path):
    """Every field README.md shows, where it shows it, is read as shown."""
    text = README.read_text()
    section = text[text.index("### node.toml"):]
    example = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    config = load_config(write(tmp_path, example))
    assert config.streams == ["cam-17a", "cam-17b"]
    assert config.transfer.ban_s == 300.0 and config.raft is not None and config.inference.model
    assert config.log_format == "text"


@pytest.mark.parametrize("line, table, field, meant", [
    ("probe_intervall_s = 1.0", "[membership]", "membership.probe_intervall_s",
     "did you mean probe_interval_s?"),
    ("max_upload = 4", "[transfer]", "transfer.max_upload", "did you mean max_uploads?"),
    ("member = [\"cam-01\"]", "[raft]", "raft.member", "did you mean members?"),
    ("metrics_lisen = \"0.0.0.0:9100\"", "", "metrics_lisen", "did you mean metrics_listen?"),
])
def test_an_unknown_field_suggests_the_nearest_valid_name(tmp_path, line, table, field, meant):
    if not table:
        text = f"{line}\n{GOOD}"
    elif table in GOOD:
        text = GOOD.replace(table, f"{table}\n{line}", 1)
    else:
        text = GOOD + f"\n{table}\n" + ('members = ["cam-01"]\n' if table == "[raft]" else "") + f"{line}\n"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert f"  {field}: unknown " in str(err.value) and meant in str(err.value), str(err.value)


def test_a_top_level_key_under_a_table_says_so(tmp_path):
    """TOML puts `streams` written after [transfer] into transfer: the message says where it belongs."""
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, GOOD + '[transfer]\nban_s = 60.0\nstreams = ["cam-17a"]\n'))
    message = str(err.value)
    assert "transfer.streams: streams is a top-level field, but it comes after the [transfer] header" \
        in message
    assert "move `streams = ...` above the first [table]" in message


def test_a_removed_field_is_not_suggested(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, GOOD + '[raft]\nmembers = ["cam-01"]\nlisen = "x"\n'))
    assert "did you mean listen" not in str(err.value)


def toml_value(value) -> str:
    """A TOML value as written by hand (JSON strings are TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


SECTIONS = {name: field for name, field in NodeConfig.model_fields.items()
            if name in ("membership", "transfer", "inference", "tls")}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(sorted(SECTIONS)), data=st.data())
def test_a_misspelt_field_is_named_with_a_real_field_of_its_table(tmp_path, section, data):
    fields = sorted(SECTIONS[section].annotation.model_fields)
    field = data.draw(st.sampled_from(fields), label="field")
    cut = data.draw(st.integers(0, len(field) - 1), label="dropped character")
    typo = field[:cut] + field[cut + 1:]
    if typo in fields or not typo:
        return
    body = GOOD.replace("[membership]\nprobe_interval_s = 0.5\nprobe_timeout_s = 0.2\n", "")
    text = body + f"[{section}]\n{typo} = 1\n" + ('dir = "creds"\n' if section == "tls" else "")
    if section == "tls":
        text = text.replace('[tls]\ndir = "creds"\n', "", 1)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    line = next(x for x in str(err.value).splitlines() if x.startswith(f"  {section}.{typo}: "))
    named = re.search(r"did you mean (\w+)\?", line)
    assert named is None or named.group(1) in fields, line
    assert named is not None or all(f in line for f in fields), line


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(
    st.one_of(st.sampled_from(sorted(NodeConfig.model_fields)), st.text(min_size=1, max_size=12)),
    st.one_of(st.integers(), st.text(max_size=8), st.booleans(),
              st.dictionaries(st.text(min_size=1, max_size=8), st.integers(), max_size=3)),
    max_size=6))
def test_any_table_is_a_config_or_a_config_error(tmp_path, doc):
    """Whatever the file holds, the loader answers with a config or one ConfigError, never a crash."""
    path = tmp_path / "fuzz.toml"
    path.write_text("\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items()) + "\n",
                    errors="surrogatepass")
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: ")


def test_sites_mode_in_the_node_toml(tmp_path):
    """`pools = "sites"`: the site pool's core admits this site only, the federation core is its own
    pool with memberlist's WAN timings (or the site pool's, if asked); without a `site` label the config
    says what to add."""
    text = GOOD + 'pools = "sites"\nrepresentatives = 2\nfederation_seeds = ["10.0.2.1:7000"]\n'
    membership = load_config(write(tmp_path, text)).membership
    assert membership.to_core().site_only and membership.to_core().pool == ""
    federation = membership.federation_core()
    assert federation.pool == "federation" and not federation.site_only
    assert (federation.probe_interval_s, federation.probe_timeout_s, federation.suspicion_mult,
            federation.gossip_interval_s, federation.gossip_nodes, federation.push_pull_interval_s) == (
        5.0, 3.0, 6, 0.5, 4, 60.0)  # memberlist's DefaultWANConfig
    assert federation.max_gossip_bytes == membership.to_core().max_gossip_bytes  # the rest: the site's
    same = load_config(write(tmp_path, text + 'federation_timings = "site"\n')).membership.federation_core()
    assert same.probe_interval_s == 0.5 and same.pool == "federation"
    # Joins of other sites are retried every 30 s at most (Consul's retry_interval), not every 60 s
    # WAN push-pull; on site timings, every push-pull.
    assert retry_interval_s(federation) == 30.0
    assert retry_interval_s(same) == same.push_pull_interval_s
    with pytest.raises(ConfigError, match="federation_timings.*'wan' or 'site'"):
        load_config(write(tmp_path, text + 'federation_timings = "lan"\n'))
    assert membership.representatives == 2 and membership.federation_seeds == ["10.0.2.1:7000"]
    assert not load_config(write(tmp_path, GOOD)).membership.to_core().site_only  # flat by default
    with pytest.raises(ConfigError, match='needs a `site` label'):
        load_config(write(tmp_path, text.replace('site = "berlin"', 'zone = "berlin"')))
    with pytest.raises(ConfigError, match="federation_seeds"):
        load_config(write(tmp_path, text.replace('"10.0.2.1:7000"', '"nowhere"')))


@pytest.mark.parametrize("extra, words", [
    ('\n[transfer]\nsources = "origin"\n', 'sources = "origin" cannot work'),
])
def test_sites_mode_refuses_what_it_cannot_do_yet(tmp_path, extra, words):
    text = GOOD + 'pools = "sites"\n' + extra
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(write(tmp_path, text))


def test_sites_mode_runs_with_a_site_group(tmp_path):
    """Rollouts in sites mode reach a site leader through its representatives (tests/rollout/
    test_sites_rollouts.py), so a site group no longer needs one flat pool."""
    config = load_config(write(tmp_path, GOOD + 'pools = "sites"\n' + '\n[raft]\nmembers = ["cam-01"]\n'))
    assert config.membership.pools == "sites" and config.raft is not None


def test_federation_seeds_in_flat_mode_are_an_error_not_ignored(tmp_path):
    with pytest.raises(ConfigError, match='federation_seeds apply only with pools = "sites"'):
        load_config(write(tmp_path, GOOD + 'federation_seeds = ["10.0.2.1:7000"]\n'))
