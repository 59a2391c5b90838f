import pytest

from musicrl.settings_doc import END, README, START, main, render, replace_between_markers
from musicrl.stack.settings import StackSettings

pytestmark = pytest.mark.unit


def test_readme_settings_table_is_up_to_date():
    current = README.read_text()
    assert current == replace_between_markers(current, render()), (
        "README.md settings table is out of date: run `.venv/bin/python -m musicrl.settings_doc`"
    )


def test_every_stack_setting_is_documented_with_its_default():
    table = render()
    for name, field in StackSettings.model_fields.items():
        assert f"`MUSICRL_{name.upper()}`" in table
        assert field.description, f"{name} has no description"
    assert "| `MUSICRL_STACK_KAFKA_PORT` | int | `9092` | Tansu (Kafka protocol) port. |" in table


def test_check_mode_reports_a_stale_table(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{START}\nold\n{END}\nafter\n")
    assert main(["--check", "--readme", str(readme)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["--readme", str(readme)]) == 0
    assert main(["--check", "--readme", str(readme)]) == 0
    assert readme.read_text().endswith(f"{END}\nafter\n")


def test_missing_markers_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="no settings markers"):
        replace_between_markers("# no markers\n", "table")
