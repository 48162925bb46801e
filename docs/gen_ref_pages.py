"""Generate the API reference and the command-line options page at build time (mkdocs-gen-files).

The reference follows the package as it is laid out when the site is built: one page per module found under
``src/iwae``, in the package's own nesting, so a module that is added, moved or removed needs no edit here.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "iwae"

nav = mkdocs_gen_files.Nav()
for path in sorted(PACKAGE.rglob("*.py")):
    module = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = tuple(module.parts)
    if parts[-1] == "__main__" or any(part.startswith("_") and part != "__init__" for part in parts):
        continue
    doc = Path("reference", *parts).with_suffix(".md")
    if parts[-1] == "__init__":
        parts = parts[:-1]
        doc = doc.with_name("index.md")
    nav[parts] = doc.relative_to("reference").as_posix()
    with mkdocs_gen_files.open(doc, "w") as page:
        page.write(f"# `{'.'.join(parts)}`\n\n::: {'.'.join(parts)}\n")
    mkdocs_gen_files.set_edit_path(doc, path.relative_to(ROOT))

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as summary:
    summary.writelines(nav.build_literate_nav())


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command under ``parser``, depth first, with its full name (``iwae diagnose snr``)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((name, sub))
                found.extend((f"{name} {inner}", deeper) for inner, deeper in subcommands(sub))
    return found


os.environ["COLUMNS"] = "110"  # argparse wraps its help to the terminal's width: fix it
from iwae.cli import build_parser  # noqa: E402

parser = build_parser()
with mkdocs_gen_files.open("cli-options.md", "w") as page:
    page.write("# Command-line options\n\nThe output of `iwae COMMAND --help` for every command, generated from the "
               "command line's own parser when this site is built. The [command line](cli.md) page explains "
               "what the commands do.\n\n")
    page.write(f"## `iwae`\n\n```text\n{parser.format_help()}```\n\n")
    for name, sub in subcommands(parser):
        page.write(f"## `iwae {name}`\n\n```text\n{sub.format_help()}```\n\n")
