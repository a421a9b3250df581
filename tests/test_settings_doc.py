"""The README documents every setting: its table is generated from graceq/config.py and must match."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, create_model

from conftest import run_cli
from graceq.config import CampaignSection, Settings
from graceq.settings_doc import NO_DESCRIPTION, readme_block, settings_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_settings_table_is_the_generated_one():
    assert readme_block(README.read_text()) == settings_markdown(), (
        "README.md's settings table is out of date: run `python -m graceq.settings_doc README.md`")


def test_every_field_of_every_section_is_in_the_table():
    table = settings_markdown()
    for section, model in ((n, f.annotation) for n, f in Settings.model_fields.items()):
        assert f"**[{section}]**" in table
        for key in model.model_fields:
            assert f"| `{key}` |" in table, (section, key)
    assert "`source`" in table and "| `on_bad_molecule` |" in table


def test_a_new_setting_appears_without_touching_the_generator():
    campaign = create_model("CampaignWithStopRule", __base__=CampaignSection,
                            stop_rule=(str, Field("risk", description="which stopping rule decides")),
                            risk=(float, Field(0.05)))
    settings = create_model("SettingsWithStopRule", __base__=Settings, campaign=(campaign, ...))
    table = settings_markdown(settings, engines=False)
    assert '| `stop_rule` | str | "risk" | which stopping rule decides |' in table
    assert f"| `risk` | float | 0.05 | {NO_DESCRIPTION} |" in table


def test_graceq_settings_prints_the_table():
    assert run_cli("settings").stdout == settings_markdown()
