"""Shared by the benchmark scripts: the argument parser they all start from and the load average line."""

from __future__ import annotations

import argparse
import os


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages: a benchmark prints them at its start and end."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first line and whose epilog is its example commands."""
    lines = doc.split("\n")
    return argparse.ArgumentParser(description=lines[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(lines[2:5]))
