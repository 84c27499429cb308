"""What a `--local` run shows on the console: our lines and the progress bar.

The ranks' output also holds the libraries' (about 15 vLLM warnings per run, DeepSpeed's
accelerator notice, transformers' weight-loading bars, C++ warnings written straight to the
file descriptor), which buries the progress bar. The launcher reads torchrun's combined output
through a pipe, appends all of it to `logs/console.log`, and passes to the console only
- lines tagged by hpc_rlhf: `[rl] ...`, `[train] ...`, `[rank 3] ...`, `[<run name>] ...`
  (a word in brackets, then a space; library lines start with a timestamp, `(MainProcess`,
  `[rank0]:` or plain text), and
- progress-bar updates whose label is one word (`<run name>:  25%|...`; the libraries' bars
  are labelled with several words: "Loading weights", "Processed prompts").
`logging.verbose=true` shows everything. Rank logs (logs/rank<R>.log) keep each rank's Python
output either way.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import TextIO

OURS = re.compile(r"^\[(rank \d+|[A-Za-z0-9_.-]+)\] ")
BAR = re.compile(r"^[A-Za-z0-9_.-]+: +\d+%\|")
_BREAK = re.compile(r"[\r\n]")


def shown(segment: str) -> bool:
    """True for a line or bar update the console shows (see the module doc)."""
    return bool(OURS.match(segment) or BAR.match(segment))


class ConsoleFilter:
    """Feed it the job's output as it arrives; it writes everything to `log` and the shown
    parts to `out`. A bar update is shown as soon as it arrives (tqdm ends it only with the
    next update); a shown line first clears the bar and then redraws it."""

    def __init__(self, out: TextIO, log: TextIO, verbose: bool = False):
        self.out, self.log, self.verbose = out, log, verbose
        self.buf, self.bar = "", ""   # pending partial segment; the bar now on screen
        self.tty = out.isatty()
        self.lock = threading.Lock()

    def feed(self, text: str) -> None:
        with self.lock:
            self.log.write(text)
            self.log.flush()
            if self.verbose:
                self.out.write(text)
                self.out.flush()
                return
            self.buf += text
            while True:
                m = _BREAK.search(self.buf)
                if not m:
                    break
                segment, end, self.buf = self.buf[:m.start()], m.group(), self.buf[m.end():]
                self._segment(segment, end)
            if BAR.match(self.buf):  # the bar's newest state, not yet ended by the next one
                self._show_bar(self.buf)
                self.buf = ""
            self.out.flush()

    def say(self, line: str) -> None:
        """A line of the launcher's own, above the bar."""
        with self.lock:
            self.log.write(line + "\n")
            self.log.flush()
            self._line(line)
            self.out.flush()

    def close(self) -> None:
        with self.lock:
            if self.buf:
                self._segment(self.buf, "\n")
                self.buf = ""
            if self.bar:
                self.out.write("\n")
                self.bar = ""
            self.out.flush()

    def _segment(self, segment: str, end: str) -> None:
        if BAR.match(segment):
            self._show_bar(segment)
        elif OURS.match(segment):
            self._line(segment)

    def _show_bar(self, text: str) -> None:
        self.out.write("\r" + text + ("\x1b[K" if self.tty else ""))
        self.bar = text

    def _line(self, line: str) -> None:
        if self.bar:
            self.out.write("\r\x1b[K" if self.tty else "\n")
        self.out.write(line + "\n")
        if self.bar and self.tty:
            self.out.write(self.bar)


def pump(fd: int, console: ConsoleFilter) -> threading.Thread:
    """A thread that reads `fd` until EOF into `console` (decoding UTF-8 across reads)."""
    import codecs

    def run() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            console.feed(decoder.decode(data))
        console.feed(decoder.decode(b"", final=True))
        os.close(fd)
        console.close()

    t = threading.Thread(target=run, daemon=True, name="hpc_rlhf-console")
    t.start()
    return t


def open_console_log(run_dir: Path) -> TextIO:
    path = Path(run_dir) / "logs" / "console.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8", errors="replace")
