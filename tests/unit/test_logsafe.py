"""core.logsafe: a value in a log record cannot start a line of its own (issue 11 item 2).

Checked through both programs' formatters: the plugins' (cni.log) and ipamd's key=value one."""

from __future__ import annotations

import logging

import pytest

from core.logsafe import SafeFormatter, escape
from ipamd.cli import _KeyValueFormatter


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain", "plain"), ("a\nb", "a\\nb"), ("a\r\nb", "a\\r\\nb"), ("\x1b[2J", "\\x1b[2J"),
    ("x\u2028y", "x\\u2028y"), ("tab\there", "tab\\there"), ("\x85", "\\x85"), ("é✓", "é✓"),
])
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad value\nFAKE LINE")
        except ValueError:
            import sys
            exc_info = sys.exc_info()
    rec = logging.LogRecord("ipamd.service", logging.INFO, __file__, 1, msg, args, exc_info)
    rec.container_id = "c1\nts=forged"
    return rec


@pytest.mark.parametrize("formatter", [SafeFormatter("%(levelname)s %(container_id)s %(message)s",
                                                     fields=("container_id",)), _KeyValueFormatter()])
def test_every_record_is_one_line_plus_an_indented_traceback(formatter: logging.Formatter) -> None:
    out = formatter.format(_record("rpc=Release network=%s", "net\nts=2026 level=info msg=forged"))
    assert "\n" not in out and "net\\nts=2026" in out
    out = formatter.format(_record("rpc=%s failed", "Allocate", exc=True))
    _first, *rest = out.split("\n")
    assert rest and all(line.startswith("  | ") for line in rest)
    assert any("bad value\\nFAKE LINE" in line for line in rest)
