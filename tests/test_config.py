from __future__ import annotations

from pathlib import Path

import pytest

from miner.config import load_config
from miner.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_is_valid_and_paths_are_relative_to_it() -> None:
    config = load_config(ROOT / "examples" / "mine.toml", {})
    assert config.data == (ROOT / "data" / "cranfield").resolve()
    assert config == load_config(None, {"data": ROOT / "data" / "cranfield", "out": config.out})  # lists defaults


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('data = "d"\nout = "o"\n[sample]\nnum_negatives = 2\nstrategy = "random"\n')
    config = load_config(path, {"sample.num_negatives": 7, "filter.method": None})
    assert config.sample.num_negatives == 7 and config.sample.strategy == "random"
    assert config.data == tmp_path / "d"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'out = "o"\ndata = "d"\n[filter]\npct = 1.5\n',
            "c.toml:4: filter.pct: Input should be less than or equal to 1",
        ),
        ('out = "o"\ndata = "d"\n[sample]\nstrategy = "best"\n', "c.toml:4: sample.strategy: Input should be"),
        ('out = "o"\ndata = "d"\nbogus = 1\n', "c.toml:3: bogus: unknown setting"),
        ('out = "o"\ndata = "d\n', "c.toml: not valid TOML"),
        ('out = "o"\n', "c.toml: data: required setting is missing"),
        (
            'out = "o"\ndata = "d"\n[filter]\nrange_min = 10\nrange_max = 12\n',
            "holds fewer candidates than sample.num_negatives (5)",
        ),
        (
            'out = "o"\ndata = "d"\n[filter]\nmethod = "topk-abs"\nmax_score = -1.5\n',
            "filter.max_score (-1.5) is below every cosine the bi-encoder teacher can give",
        ),
        (
            'out = "o"\ndata = "d"\n[filter]\ndenoise_threshold = -2\n',
            "every candidate is dropped",
        ),
    ],
)
def test_bad_settings_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        load_config(path, {})
    assert expected in str(caught.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "nope.toml", {})


def test_every_command_line_key_is_an_option_of_mine() -> None:
    import inspect

    from miner.cli import mine
    from miner.config import CLI_KEYS

    assert set(CLI_KEYS) <= set(inspect.signature(mine).parameters)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[sample]\nmethod = "topk-abs"\n',
            "c.toml:2: sample.method: unknown setting; 'method' belongs in [filter]: move it there (as filter.method)",
        ),
        (
            "[filter]\nmargn = 0.1\n",
            "c.toml:2: filter.margn: unknown setting; did you mean filter.margin?",
        ),
        (
            "[sample]\nthreads = 2\n",
            "c.toml:2: sample.threads: unknown setting; 'threads' belongs at the top level, before any [section]",
        ),
        ("num_negatives = 3\n", "c.toml:1: num_negatives: unknown setting; 'num_negatives' belongs in [sample]"),
        ("[filtr]\nmethod = 'none'\n", "c.toml:1: filtr: unknown setting; did you mean filter?"),
    ],
    ids=["misplaced", "typo", "section-key-at-top", "top-key-in-section", "section-typo"],
)
def test_an_unknown_key_is_pointed_to_its_section_or_nearest_name(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        load_config(path, {"data": tmp_path, "out": tmp_path / "o"})
    assert expected in str(caught.value)


def test_a_setting_from_the_command_line_is_named_by_its_flag(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        load_config(None, {"data": tmp_path, "out": tmp_path / "o", "sample.num_negatives": 0})
    assert str(caught.value).startswith("--num-negatives: Input should be greater than or equal to 1; ")
    path = tmp_path / "c.toml"
    path.write_text("[sample]\nnum_negatives = 0\n")
    with pytest.raises(InputError) as caught:
        load_config(path, {"data": tmp_path, "out": tmp_path / "o", "sample.num_negatives": None})
    assert str(caught.value).startswith(f"{path}:2: sample.num_negatives: Input should be greater than or equal to 1")


def test_help_shows_each_range_the_config_enforces() -> None:
    import typer.main

    from miner.cli import app
    from miner.config import CLI_KEYS, setting_range

    assert setting_range("sample.num_negatives") == ">= 1"
    assert setting_range("filter.pct") == "> 0 and <= 1"
    mine = typer.main.get_command(app).commands["mine"]  # type: ignore[attr-defined]
    helps = {param.name: param.help or "" for param in mine.params}
    ranged = {name: setting_range(key) for name, key in CLI_KEYS.items() if setting_range(key)}
    assert ranged and all(bounds in helps[name] for name, bounds in ranged.items())
    assert "[5; >= 1]" in helps["num_negatives"]
