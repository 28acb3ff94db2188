"""The demo's rollout narration says where each site stopped a bad version, as its report says."""

from mesh.demo import _aborted_at


def test_one_wave_everywhere_is_said_once():
    report = {
        "sites": [
            {"site": "ams", "wave": 1, "state": "aborted"},
            {"site": "ber", "wave": 1, "state": "aborted"},
        ]
    }
    assert _aborted_at(report) == "at wave 1 in every site"


def test_a_site_without_the_rollout_is_left_out():
    report = {
        "sites": [
            {"site": "ams", "wave": 1, "state": "aborted"},
            {"site": "chi", "wave": 0, "state": "unregistered"},
        ]
    }
    assert _aborted_at(report) == "at wave 1 in every site"


def test_a_site_that_stopped_later_is_named_with_its_wave():
    report = {
        "sites": [
            {"site": "ber", "wave": 2, "state": "aborted"},
            {"site": "ams", "wave": 1, "state": "aborted"},
        ]
    }
    assert _aborted_at(report) == "in ams at wave 1, ber at wave 2"
