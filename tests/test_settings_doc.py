"""The README's configuration table lists every setting with its real default."""

from __future__ import annotations

import json
import re
from pathlib import Path

from nhi.infra.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def _table() -> dict[str, str]:
    rows = re.findall(r"^\| `(NHI_[A-Z0-9_]+)` \| ([^|]+) \|", README.read_text(), re.MULTILINE)
    return {name: default.strip() for name, default in rows}


def test_every_setting_is_documented_with_its_default() -> None:
    table = _table()
    expected = {}
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, dict):
            default = json.dumps(default)
        expected[f"NHI_{name.upper()}"] = "unset" if default is None else f"`{default}`"
    assert table == expected


def test_settings_refuse_bad_values_by_name() -> None:
    import pytest
    from pydantic import ValidationError

    for field, value in (("api_port", "0"), ("iam_path", "no-slashes"), ("log_level", "LOUD")):
        with pytest.raises(ValidationError) as err:
            Settings(**{field: value})
        assert field in str(err.value)
    assert Settings(database_url="postgres://u@h/db").database_url == "postgresql+psycopg://u@h/db"
