"""Log lines that a value from a config, an environment or a request cannot forge.

Why: the plugins log values that a NetworkAttachmentDefinition's author, a pod's annotations or
a runtime's environment chose (a network name, CNI_NETNS, CNI_ARGS keys), and ipamd logs fields of
the requests it receives. A newline in one of them would start a line of the author's choosing
in the log (a fake "DEL succeeded", a fake error) and an escape sequence would rewrite what a
terminal shows. `escape` renders every control character visibly (\\n, \\x1b, \\u2028), and
`SafeFormatter` applies it to the whole message and to the record's extra fields, and indents
each line of a traceback so that no line of it can pass for a record of its own. stdlib only.
"""

from __future__ import annotations

import logging
import re

# C0, DEL, C1 and the Unicode line/paragraph separators (str.splitlines() breaks on them).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\x85]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _render(m: re.Match[str]) -> str:
    ch = m.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def escape(text: str) -> str:
    """`text` with every control character (and line separator) written as an escape."""
    return _CONTROL.sub(_render, text)


class SafeFormatter(logging.Formatter):
    """A Formatter whose output is one line per record (plus an indented traceback), whatever the
    message and its arguments contain. `fields` names the record attributes (set by filters or
    `extra=`) that are escaped too."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None,
                 fields: tuple[str, ...] = ()) -> None:
        super().__init__(fmt, datefmt)
        self.fields = fields

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        for name in self.fields:
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, escape(value))
        return super().formatMessage(record)

    def formatException(self, ei: object) -> str:
        text = super().formatException(ei)  # type: ignore[arg-type]
        return "\n".join("  | " + escape(line) for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("  | " + escape(line) for line in stack_info.splitlines())
