"""The README stays true to the code: every setting has a row in its configuration table."""

from pathlib import Path

from vq_tasks.settings import Settings

README = Path(__file__).parents[2] / "README.md"


def test_every_setting_is_documented_with_its_default():
    rows = {
        line.split("|")[1].strip(): line for line in README.read_text().splitlines() if line.startswith("| ")
    }
    for name, field in Settings.model_fields.items():
        assert name.upper() in rows, f"{name.upper()} missing from the README's configuration table"
        default = field.default
        if isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, float):
            shown = f"{default:g}"
        elif isinstance(default, int | str):
            shown = str(default)
        else:
            continue
        assert f"`{shown}`" in rows[name.upper()], f"{name.upper()}: README does not show default {shown}"


def test_every_documented_variable_exists():
    table = README.read_text().split("| variable | default | meaning |")[1].split("\n\n")[0]
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("| ")]
    assert set(names) == {n.upper() for n in Settings.model_fields}
