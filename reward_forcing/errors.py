"""User-facing errors: raised anywhere, reported by the CLIs as one line with a non-zero exit."""
import argparse
import os
import sys


class UserError(Exception):
    """A problem with the user's input (config, files, flags) rather than a bug in the code."""


class ConfigError(UserError):
    """Unreadable config file, unknown key, or an invalid value."""


class CheckpointError(UserError):
    """A checkpoint or asset that is missing, truncated, or does not match the model."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one-line UserErrors (run_cli prints them and exits 2), not usage + exit."""

    def error(self, message):
        raise UserError(message)


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; a UserError becomes `error: <message>` on stderr and exit status 2.

    Under torchrun every process meets the same bad input, so only rank 0 (the `RANK` torchrun sets) prints
    the line; every process still exits with 2, and torchrun then reports the failed processes itself.
    """
    try:
        return main(argv) or 0
    except UserError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
