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
