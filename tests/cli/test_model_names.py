"""`train` and `models` on bad model names, a malformed configs/variants.yml and settings a
component refuses: one line and exit 1, never a traceback; `models` flags every broken
or conflicting entry."""
import shutil
from pathlib import Path

import pytest
import srsly
from typer.testing import CliRunner

from spacy_agban.cli import app
from test_errors import fails_in_one_line

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    folder = tmp_path / "configs"
    folder.mkdir()
    shutil.copy(CONFIGS / "concat.cfg", folder / "concat.cfg")
    return folder


@pytest.mark.parametrize("entry, expected", [
    ({"base": "concat", "overrides": 5}, "overrides must map config settings"),
    ({"overrides": {"training.seed": 1}}, "needs base"),
    ([1, 2], "must be a mapping"),
    ({"base": "concat", "overide": {}}, "unknown keys ['overide']"),
    ({"base": "concat", "overrides": ["training.seed"]}, "overrides must map"),
])
def test_a_malformed_variant_is_one_line(configs: Path, entry, expected) -> None:
    srsly.write_yaml(configs / "variants.yml", {"broken": entry})
    fails_in_one_line(["train", "broken", "--configs", configs, "--dry-run"], "variant 'broken'", expected)


@pytest.mark.parametrize("text, expected", [
    ("- concat\n- agban\n", "must map model names"),
    ("broken: {base: concat\n", "cannot read"),
    ("a:\n  base: concat\na:\n  base: concat\n", "duplicate key"),
])
def test_an_unreadable_variants_file_is_one_line(configs: Path, text, expected) -> None:
    (configs / "variants.yml").write_text(text)
    fails_in_one_line(["train", "concat", "--configs", configs, "--dry-run"], "variants.yml", expected)
    fails_in_one_line(["models", "--configs", configs], "variants.yml", expected)


def test_models_flags_broken_and_conflicting_entries(configs: Path) -> None:
    srsly.write_yaml(configs / "variants.yml", {
        "good": {"base": "concat", "description": "fine", "overrides": {"training.seed": 1}},
        "concat": {"base": "concat"},  # also configs/concat.cfg
        "no_base": {"overrides": {}},
        "numbers": {"base": "concat", "overrides": 5},
        "no_section": {"base": "concat", "overrides": {"nosuchsection.key": 1}},
    })
    result = CliRunner().invoke(app, ["models", "--configs", str(configs)])
    assert result.exit_code == 1 and type(result.exception) is SystemExit, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, result.output
    for name, text in (("concat", "both a variant"), ("no_base", "needs base"), ("numbers", "overrides must map"),
                       ("no_section", "do not apply")):
        assert any(f"'{name}'" in line and text in line for line in errors), (name, result.output)
    assert any(line.startswith("good ") for line in result.output.splitlines())
    # and none of it is said of the shipped configs
    shipped = CliRunner().invoke(app, ["models", "--configs", str(CONFIGS)])
    assert shipped.exit_code == 0 and "error" not in shipped.output, shipped.output


def test_train_outside_the_checkout_says_where_it_looked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = fails_in_one_line(["train", "concat"], "no model 'concat'", str(tmp_path / "configs"), "--configs DIR")
    assert "known: )" not in line
    (tmp_path / "configs").mkdir()
    fails_in_one_line(["train", "concat"], "holds no .cfg file", "--configs DIR")
    fails_in_one_line(["models"], "no model names", "--configs DIR")


def test_train_with_a_setting_the_pipe_refuses_is_one_line() -> None:
    fails_in_one_line(["train", "concat", "--configs", CONFIGS, "--components.agban.min_confidence", "2"],
                      "concat.cfg", "min_confidence must be in [0, 1)", "got 2")
