"""`models.dicom`: the DICOM node's config is validated at start, never accepted and then ignored."""

from __future__ import annotations

import pytest

from cxr_dicom.config import dicom_config
from cxr_serving.errors import ConfigError
from cxr_serving.roles import platform_admin_methods
from cxr_serving.settings import load_settings
from tests.support.paths import REPO
from tests.support.servers import make_settings

STOW = {"stow_url": "http://pacs:8042/dicom-web"}


@pytest.mark.parametrize(
    ("name", "data_path"), [("production.json", "/mnt/data/dicom"), ("local.json", "var/data/dicom")]
)
def test_shipped_configs_give_the_node_its_paths_and_destinations(name, data_path):
    settings = load_settings(REPO / "config" / name, environ={})
    cfg = dicom_config(settings)
    assert str(cfg.data_path) == data_path and cfg.destinations.stow_url
    assert settings.endpoint("dicom").port == 50055


def test_relative_paths_are_under_data_path_and_backoff_doubles_up_to_its_cap(tmp_path):
    settings = make_settings(
        data_path=str(tmp_path),
        models={
            "dicom": {
                "data_path": "node",
                "retry_backoff_initial_s": 2,
                "retry_backoff_max_s": 10,
                "destinations": {**STOW, "fhir_folder": "fhir"},
            }
        },
    )
    cfg = dicom_config(settings)
    assert cfg.data_path == tmp_path / "node" and cfg.destinations.fhir_folder == tmp_path / "fhir"
    assert [cfg.backoff_s(n) for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (None, "models.dicom: missing"),
        ({}, "destinations"),
        ({"destinations": {"fhir_folder": "/x"}}, "results would go nowhere"),
        ({"destinations": STOW, "ae_title": "A" * 17}, "AE title"),
        ({"destinations": STOW, "accepted_calling_ae_titles": ["BAD\\AE"]}, "AE title"),
        ({"destinations": STOW, "priority_rules": [{"keyword": "NotAKeyword", "values": ["x"]}]}, "keyword"),
        ({"destinations": STOW, "priority_rules": [{"calling_ae_titles": ["ER"], "when": "x"}]}, "unknown keys"),
        ({"destinations": STOW, "retry_backoff_initial_s": 60, "retry_backoff_max_s": 5}, "retry_backoff"),
        ({"destinations": STOW, "typo_key": 1}, "typo_key"),
        # analysis 120 s + one STOW-RS send of 60 s: a 180 s lease would expire mid-attempt
        ({"destinations": STOW, "lease_s": 180}, r"lease_s \(180\) must exceed the longest attempt, 180s"),
        (
            {"destinations": {**STOW, "fhir_url": "http://fhir/", "timeout_s": 30}, "lease_s": 150},
            r"lease_s \(150\) must exceed the longest attempt, 180s",
        ),
        ({"destinations": STOW, "max_transient_retry_s": 0}, "max_transient_retry_s"),
    ],
)
def test_bad_sections_are_refused_at_start(section, message):
    settings = make_settings(models={} if section is None else {"dicom": section})
    with pytest.raises(ConfigError, match=message):
        dicom_config(settings)


def test_retry_dead_letter_is_an_admin_rpc_that_cannot_be_opened():
    method = "/cxr.dicom.v1.DicomService/RetryDeadLetter"
    assert method in platform_admin_methods()
    assert "/cxr.dicom.v1.DicomService/GetStudyStatus" not in platform_admin_methods()
    with pytest.raises(ConfigError, match="admin RPCs"):
        load_settings(None, environ={"CXR_SECURITY__UNAUTHENTICATED_METHODS": f'["{method}"]'})


def test_a_lease_longer_than_the_longest_attempt_is_accepted():
    settings = make_settings(models={"dicom": {"destinations": STOW, "lease_s": 181}})
    cfg = dicom_config(settings)
    assert cfg.longest_attempt_s() == 180 and cfg.max_transient_retry_s == 86400
