"""User-facing errors: raised anywhere, reported by the CLIs as one line with a non-zero exit."""
import sys


class UserError(Exception):
    """A problem with the user's input (config, files, flags) rather than a bug in the code."""


class ConfigError(UserError):
    """Unreadable config file, unknown key, or an invalid value."""


class CheckpointError(UserError):
    """A checkpoint or asset that is missing, truncated, or does not match the model."""


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; a UserError becomes `error: <message>` on stderr and exit status 2."""
    try:
        return main(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
