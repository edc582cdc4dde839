"""Progress bars of the long commands (eval, coverage, fit-frequency, fit-clusters, tune, benchmarks/).

One rule everywhere: a tqdm bar on stderr, off with `-q/--quiet` (alias `--no-progress`) and off by itself
when stderr is not a terminal (logs, CI, pipes), so captured output never holds bar frames.

    >>> with progress_bar(args.no_progress, total=len(batches), unit="batch") as bar:   # doctest: +SKIP
    ...     for batch in batches:
    ...         bar.update(1)
"""
from __future__ import annotations

import argparse
import sys


def add_quiet_arg(parser: argparse.ArgumentParser) -> None:
    """-q / --quiet / --no-progress: no progress bars (stored as `args.no_progress`)."""
    parser.add_argument("-q", "--quiet", "--no-progress", dest="no_progress", action="store_true",
                        help="no progress bars (they are off anyway when stderr is not a terminal)")


def progress_bar(quiet: bool = False, iterable=None, **kwargs):
    """A tqdm bar on stderr; disabled when `quiet` and when stderr is not a terminal (tqdm's disable=None)."""
    from tqdm import tqdm
    return tqdm(iterable, disable=True if quiet else None, file=sys.stderr, dynamic_ncols=True, **kwargs)


def echo(text: str = "") -> None:
    """`print(text, flush=True)` that does not tear an active progress bar (tqdm.write moves it below)."""
    from tqdm import tqdm
    tqdm.write(text)
    sys.stdout.flush()
