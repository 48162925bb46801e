"""The code blocks of README.md and of the documentation pages (docs/**/*.md), run as a reader would run them.

Every ```bash and ```python block is found by reading the pages, so a new block is tested without any edit
here. Each page runs its blocks in order in a working directory of its own, outside the repository (so the
repository's runs/ is never written): README.md first, in an empty directory; then every other page in a copy
of the directory the README left, so that a page can use the README's quick-start run, runs/quickstart.
Python blocks are executed with ``exec``, a page's blocks sharing one namespace; the commands of bash blocks
(continuation lines joined, comments cut, ``&&`` chains split) are run as follows.

- ``iwae ARGS`` runs in this process (``iwae.cli.main``) and must exit with 0, with these substitutions:
  a training run on data that is downloaded (not the built-in ``digits``, not a file) runs, with the data at
  hand in ``$IWAE_DATA_DIR`` or the cache, up to the start of training (everything the command checks, and
  the model), and is parsed otherwise; ``iwae reproduce`` (hours) is
  parsed; ``iwae diagnose`` runs with ``--draws`` cut to ``DIAGNOSE_DRAWS``; and a command already run word
  for word in the directory the page starts from (the README's quick start, repeated in a page) is not run
  again, since its output is already there.
- ``torchrun ... -m iwae ARGS`` (several processes, often GPUs): the ``iwae`` arguments are parsed.
- ``python benchmarks/NAME.py ...`` and ``python results/NAME.py`` (minutes): the script must exist and
  define every option the command gives it.
- The commands that set up an environment (``python3 -m venv``, ``.``/``source``, ``pip``,
  ``python -m pytest``, ``mkdocs``) are not run here: CI runs them itself (.ci/run).
- Any other command fails the test: give it a rule here, or mark its block as not run.

A block is left out by an HTML comment on the line right above its opening fence that says why, e.g.
``<!-- not run: needs a GPU -->``. And every ``iwae.…`` name that a page writes in code style must name a
module or an object of the package as it is laid out.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from iwae import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->$")
FENCE = re.compile(r"^(?P<fence>`{3,})(?P<language>[\w+-]*)\s*$")
RUN_LANGUAGES = ("bash", "python")
ENVIRONMENT_PROGRAMS = {"pip", "pip3", ".", "source", "mkdocs"}
ENVIRONMENT_MODULES = {"venv", "pytest", "pip", "mkdocs"}
DIAGNOSE_DRAWS = 5
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
CITED_NAME = re.compile(r"`(iwae(?:\.[A-Za-z_]\w*)+)")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    code: str
    not_run: str | None  # why the block is not run, from its marker

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    """README.md and every page under docs/, its own files only (not the folders linked into it, such as the
    reports of results/, which record the commands that made them)."""
    found = []
    for folder, subfolders, files in os.walk(DOCS):  # os.walk does not follow symbolic links
        subfolders[:] = sorted(name for name in subfolders if not (Path(folder) / name).is_symlink())
        found.extend(Path(folder) / name for name in sorted(files) if name.endswith(".md"))
    return [README, *found]


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, with the reason of a ``<!-- not run: ... -->`` marker above one."""
    lines = page.read_text().splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].strip() == opening["fence"]), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{index + 1}: a code block that is never closed"
        marker = NOT_RUN.match(lines[index - 1].strip()) if index else None
        if marker:
            assert marker["reason"], f"{page.relative_to(ROOT)}:{index}: say why the block is not run"
        found.append(Block(page, index + 1, opening["language"], "\n".join(lines[index + 1:end]) + "\n",
                           marker["reason"] if marker else None))
        index = end + 1
    return found


def commands(script: str) -> Iterator[list[str]]:
    """The commands of a bash block: continuations joined, comments cut, ``&&`` and ``;`` chains split."""
    for line in script.replace("\\\n", " ").splitlines():
        command: list[str] = []
        for word in shlex.split(line, comments=True):
            if word in ("&&", ";"):
                if command:
                    yield command
                command = []
            else:
                command.append(word)
        if command:
            yield command


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def is_downloaded_training(argv: list[str]) -> bool:
    """A training run on a dataset that is downloaded (minutes to days), not on the built-in digits or a file."""
    dataset = option(argv, "--dataset") or "digits"
    return (argv[:1] == ["train"] and "--resume" not in argv and dataset != "digits"
            and not dataset.endswith((".npy", ".npz")))


class TrainingStarts(BaseException):
    """Raised where a run makes its optimizer: every check before training has passed (a BaseException, so
    that the command line's error handling lets it through)."""


def check_before_training(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``iwae train`` up to the start of training, where it makes its optimizer: options, device, data and
    the memory check, and the model. Data that is not at hand ($IWAE_DATA_DIR or the cache; a user's first run
    downloads it) cannot be checked here: the command is then parsed."""
    from iwae import data

    dataset, data_dir = option(argv, "--dataset"), option(argv, "--data-dir")
    try:
        data.load(dataset, data_dir, download=False)
    except data.DataError:
        assert cli.build_parser().parse_args(argv).command == "train", argv
        return

    def training_starts(*args: object, **kwargs: object) -> None:
        raise TrainingStarts

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.Adam, "__init__", training_starts)
        with pytest.raises(TrainingStarts):
            cli.main(argv)


def run_iwae(argv: list[str], done: set[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch) -> None:
    if tuple(argv) in done:
        return  # already run, word for word, in the directory this page starts from: its output is there
    if argv[0] == "reproduce":
        assert cli.build_parser().parse_args(argv).command == "reproduce"
    elif is_downloaded_training(argv):
        check_before_training(argv, monkeypatch)
    else:
        run = argv
        if argv[0] == "diagnose":  # each setting costs 2 x --draws backward passes: cut them
            draws = min(int(option(argv, "--draws") or DIAGNOSE_DRAWS), DIAGNOSE_DRAWS)
            if "--draws" in argv:
                at = argv.index("--draws")
                run = argv[:at] + argv[at + 2:]
            run = [*run, "--draws", str(draws)]
        assert cli.main(run) == 0, argv
    done.add(tuple(argv))


def check_script(argv: list[str], block: Block) -> None:
    """A ``python SCRIPT ...`` command of the repository's benchmarks or results: the script is there and
    defines every option given to it."""
    script = ROOT / argv[1]
    assert script.is_file() and script.relative_to(ROOT).parts[0] in ("benchmarks", "results"), \
        f"{block.where}: {shlex.join(argv)}: only the repository's benchmarks/ and results/ scripts are known here"
    source = script.read_text()
    for word in argv[2:]:
        if word.startswith("--"):
            assert f'"{word.split("=")[0]}"' in source, f"{block.where}: {script.name} has no option {word}"


def run_bash(block: Block, done: set[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch) -> None:
    for argv in commands(block.code):
        while argv and ASSIGNMENT.match(argv[0]):  # VAR=value before a command: its environment
            name, value = argv.pop(0).split("=", 1)
            monkeypatch.setenv(name, os.path.expandvars(value))
        if argv[0] == "export":
            for assignment in argv[1:]:
                name, value = assignment.split("=", 1)
                monkeypatch.setenv(name, os.path.expandvars(value))
        elif argv[0] == "iwae":
            run_iwae(argv[1:], done, monkeypatch)
        elif argv[0] == "torchrun" or argv[:3] == ["python", "-m", "torch.distributed.run"]:
            start = next(i for i in range(len(argv) - 1) if argv[i:i + 2] == ["-m", "iwae"])
            assert cli.build_parser().parse_args(argv[start + 2:]).command, argv
        elif argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
            check_script(argv, block)
        elif argv[0] in ENVIRONMENT_PROGRAMS or (argv[0] in ("python", "python3") and argv[1:2] == ["-m"]
                                                  and argv[2] in ENVIRONMENT_MODULES):
            continue  # sets up an environment: CI runs these itself
        else:
            pytest.fail(f"{block.where}: no rule runs `{shlex.join(argv)}`: add one to tests/test_docs.py, or mark "
                        "the block <!-- not run: why -->")


def run_page(page: Path, namespace: dict[str, object], done: set[tuple[str, ...]],
             monkeypatch: pytest.MonkeyPatch) -> None:
    for block in blocks(page):
        if block.not_run is not None or block.language not in RUN_LANGUAGES:
            continue
        if block.language == "python":
            exec(compile(block.code, block.where, "exec"), namespace)
        else:
            run_bash(block, done, monkeypatch)


@pytest.fixture(scope="module")
def readme_workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, frozenset[tuple[str, ...]]]:
    """An empty directory in which the README's blocks have run (its quick start trains runs/quickstart), and
    the ``iwae`` commands run there."""
    workspace = tmp_path_factory.mktemp("readme")
    done: set[tuple[str, ...]] = set()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(workspace)
        run_page(README, {"__name__": "docs"}, done, monkeypatch)
    return workspace, frozenset(done)


def test_every_page_is_found_and_every_marker_says_why() -> None:
    found = pages()
    assert README in found and DOCS / "index.md" in found
    for page in found:
        for block in blocks(page):
            assert block.not_run is None or block.not_run.strip(), block.where


def test_the_pages_commands_write_under_runs() -> None:
    """Every ``iwae`` command of a page writes under runs/ (which git ignores) or an absolute path, so that a reader
    who runs the pages in the repository leaves it clean: no other relative --out, and no table whose default --out
    is its name."""
    elsewhere = []
    for page in pages():
        for block in blocks(page):
            if block.language != "bash" or block.not_run is not None:
                continue
            for argv in commands(block.code):
                if "iwae" in argv and len(argv) > argv.index("iwae") + 1:
                    args = argv[argv.index("iwae") + 1:]
                    out = option(args, "--out") or (args[1] if args[0] == "reproduce" else None)
                    if out is not None and not out.startswith(("runs/", "/")):  # under runs/, or elsewhere
                        elsewhere.append(f"{block.where}: {' '.join(argv)}")
    assert not elsewhere, "commands that write outside runs/:\n" + "\n".join(elsewhere)


def resolves(name: str) -> bool:
    """Whether a dotted name is a module of the package, or an attribute of one."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def test_the_names_the_pages_cite_exist() -> None:
    """Every ``iwae.…`` name written in code style in the pages names a module or an object of the package as
    it is laid out now."""
    missing = [f"{page.relative_to(ROOT)}: {name}" for page in pages()
               for name in sorted(set(CITED_NAME.findall(page.read_text()))) if not resolves(name)]
    assert not missing, "names that are no longer in the package:\n" + "\n".join(missing)


@pytest.mark.slow
def test_the_readme_runs_as_written(readme_workspace: tuple[Path, frozenset[tuple[str, ...]]]) -> None:
    workspace, done = readme_workspace
    assert any(argv[0] == "train" for argv in done), "the README's quick start trains nothing"
    run = workspace / "runs" / "quickstart"
    assert (run / "eval.json").is_file() and (run / "figures" / "samples.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("page", [page for page in pages() if page != README],
                         ids=lambda page: page.relative_to(DOCS).as_posix())
def test_each_page_runs_as_written(page: Path, readme_workspace: tuple[Path, frozenset[tuple[str, ...]]],
                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace, done = readme_workspace
    shutil.copytree(workspace, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    run_page(page, {"__name__": "docs"}, set(done), monkeypatch)
