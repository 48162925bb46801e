"""The ``iwae`` command line."""


def main(argv: list[str] | None = None) -> int:
    print("iwae: commands arrive with the training issue")
    return 0
