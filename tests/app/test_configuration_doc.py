"""docs/configuration.md is generated from the settings classes: it must match them."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli import build_parser
from app.configuration_doc import render as render_with
from app.settings import GatewaySettings
from workers.settings import FaultSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]


def render() -> str:
    return render_with(build_parser())


def test_the_configuration_reference_is_up_to_date():
    """Fails when a setting changed without `coinserve config-doc` being run."""
    assert (ROOT / "docs" / "configuration.md").read_text() == render(), "stale: run `coinserve config-doc`"


@pytest.mark.parametrize("settings", [GatewaySettings, WorkerSettings, FaultSettings], ids=lambda s: s.__name__)
def test_every_setting_is_described(settings):
    assert [name for name, field in settings.model_fields.items() if not field.description] in ([], ["faults"])


def test_every_setting_appears_with_its_environment_variable():
    text = render()
    for settings in (GatewaySettings, WorkerSettings, FaultSettings):
        prefix = settings.model_config["env_prefix"]
        for name in settings.model_fields.keys() - {"faults"}:
            assert f"| `{prefix}{name.upper()}` |" in text
