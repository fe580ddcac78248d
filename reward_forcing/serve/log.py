"""The server's log: one line per event, whatever the layer that logs it.

Uvicorn's default log format prints a whole traceback for a logged exception, for example for its own
"Invalid UTF-8 sequence received from client." (uvicorn/protocols/websockets/websockets_sansio_impl.py); a
client's bad input must cost the log one line. The exception is kept as its type, message and the place it
was raised.
"""
import copy
import logging
from pathlib import Path

from uvicorn.config import LOGGING_CONFIG
from uvicorn.logging import DefaultFormatter

LOG = logging.getLogger("reward_forcing.serve")


def one_line(err: BaseException) -> str:
    """`Type: message (file.py:line)`, the line where `err` was raised, on one line."""
    where, tb = "", err.__traceback__
    while tb is not None:
        where = f" ({Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})"
        tb = tb.tb_next
    return " ".join(f"{type(err).__name__}: {err}".split()) + where


class OneLineFormatter(DefaultFormatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and record.exc_info[1] is not None:
            record = copy.copy(record)
            record.msg, record.args = f"{record.getMessage().strip()} ({one_line(record.exc_info[1])})", None
            record.exc_info = record.exc_text = record.stack_info = None
        return " ".join(super().format(record).split("\n"))


def log_config() -> dict:
    """uvicorn's logging config with one-line records, also for this package's logger and any other."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["default"]["()"] = f"{__name__}.{OneLineFormatter.__name__}"
    config["loggers"][LOG.name] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config["root"] = {"handlers": ["default"], "level": "WARNING"}
    return config
