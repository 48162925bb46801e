"""The README's code blocks, executed as written: every Python block, and the quick ``iwae`` commands of the
bash blocks, run in an empty directory as a new user would. Of the long commands, the MNIST run goes through
everything the command checks before training (options, device, data, memory), and the gradient diagnostics
(minutes each) are parsed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from iwae import cli, data, train
from iwae.device import resolve_device

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def iwae_commands() -> list[list[str]]:
    """The ``iwae`` commands of the README's bash blocks, as argument lists (continuations joined, comments cut)."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "iwae":
                commands.append(words[1:])
    return commands


def is_paper_run(argv: list[str]) -> bool:
    return argv[0] == "train" and "--schedule" in argv and argv[argv.index("--schedule") + 1] == "burda"


def is_long_training(argv: list[str]) -> bool:
    """A training run on data that is downloaded (minutes to days), as opposed to the built-in digits."""
    return argv[0] == "train" and "--dataset" in argv and argv[argv.index("--dataset") + 1] != "digits"


def is_long(argv: list[str]) -> bool:
    return is_long_training(argv) or argv[0] in ("diagnose", "reproduce")


def test_the_readme_has_the_blocks_it_is_checked_by() -> None:
    assert len(code_blocks("python")) == 2
    commands = iwae_commands()
    assert [argv[0] for argv in commands if not is_long(argv)] == ["train", "evaluate", "sample", "evaluate",
                                                                    "evaluate"]
    assert sum(map(is_paper_run, commands)) == 1


@pytest.mark.parametrize("block", code_blocks("python"), ids=["library", "own-model"])
def test_python_blocks_run_as_written(block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})


def test_quick_commands_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for argv in filter(lambda argv: not is_long(argv), iwae_commands()):
        assert cli.main(argv) == 0, argv
    run = tmp_path / "runs" / "quickstart"
    assert {path.name for path in run.glob("eval*.json")} == {"eval.json", "eval-test-k100-n50.json", "eval_ais.json",
                                                              "eval_bdmc.json"}
    assert {path.name for path in (run / "figures").iterdir()} == {
        "samples.png", "reconstructions.png", "training.png", "bound_vs_k.png", "ais_vs_steps.png"
    }


@pytest.mark.parametrize("argv", list(filter(is_long_training, iwae_commands())), ids=lambda argv: argv[2])
def test_the_long_commands_pass_every_check_before_training(argv: list[str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """In an empty directory, as a user would run it: options, device and data directory valid; with the data
    at hand ($IWAE_DATA_DIR or the cache; a user's first run downloads it), the data and the memory check."""
    checked: list[train.TrainConfig] = []

    def check_only(config: train.TrainConfig, run_dir: Path) -> None:
        device = resolve_device(config.device)
        assert config.data_dir is None or Path(config.data_dir).is_dir(), config.data_dir
        try:
            dataset = data.load(config.dataset, config.data_dir, download=False, split=config.data_split)
        except data.DataError:
            pass  # not at hand here: a user's first run downloads it
        else:
            train.check_memory(config, dataset.train.shape[1], device)
        checked.append(config)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "train", check_only)
    assert cli.main(argv) == 0
    assert checked and (checked[0].epochs == 3280 or not is_paper_run(argv))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["diagnose", "reproduce"])
def test_the_long_diagnostics_and_reproductions_parse(command: str) -> None:
    commands = [argv for argv in iwae_commands() if argv[0] == command]
    assert commands
    for argv in commands:
        assert cli.build_parser().parse_args(argv).command == command
