"""Argument types shared by the benchmark scripts (bad values fail in argparse, before any work)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def int_tuple(count: int):
    """argparse ``type=``: ``count`` comma-separated positive integers, e.g. '8,2,192'."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: give {count} comma-separated positive integers")
        return values

    return parse
