"""The README documents every configuration key (the settings tree is the source of truth)."""

from __future__ import annotations

from pathlib import Path

from scalebus import settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = []
    for section, field in settings.Settings.model_fields.items():
        if section == "pools":
            missing += [] if "[[pools]]" in README else ["[[pools]]"]
            continue
        model = field.annotation
        assert model is not None
        if f"[{section}]" not in README:
            missing.append(f"[{section}]")
        missing += [f"{section}.{key}" for key in model.model_fields if f"`{key}`" not in README]
    assert missing == []
