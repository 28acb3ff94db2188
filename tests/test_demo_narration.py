"""The demo's rollout narration says where each site stopped a bad version, as its report says."""

import pytest

from mesh.demo import _aborted_at


def site(name: str, wave: int, state: str = "aborted") -> dict:
    return {"site": name, "wave": wave, "state": state}


@pytest.mark.parametrize(
    ("sites", "said"),
    [
        ([site("ams", 1), site("ber", 1)], "at wave 1 in every site"),
        ([site("ams", 1), site("chi", 0, "unregistered")], "at wave 1 in every site"),  # not in it: left out
        ([site("ber", 2), site("ams", 1)], "in ams at wave 1, ber at wave 2"),  # a later wave is named
    ],
    ids=["one-wave", "site-without-the-rollout", "sites-apart"],
)
def test_the_narration_names_the_wave_each_site_stopped_at(sites, said):
    assert _aborted_at({"sites": sites}) == said
