"""A streaming reader for the Standard Workload Format (SWF) of the Parallel Workloads Archive.

One job per line, 18 whitespace-separated fields, -1 for "not recorded", `;` comment lines for
the header (MaxNodes, MaxProcs, UnixStartTime, ...). Real traces have gaps (requested processors
never recorded, cancelled jobs without a run time, the odd broken line), so the reader turns each
line into a job the simulator can run or a counted, explained skip; it never stops on bad input.
Format: https://www.cs.huji.ac.il/labs/parallel/workload/swf.html
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple

FIELDS = 18
CANCELLED = 5  # SWF status code of a job cancelled (before or while running)
GZIP_MAGIC = b"\x1f\x8b"
MAX_PROBLEMS = 20  # line-numbered messages kept; every skip is still counted

BUNDLED_TRACES = (
    "SDSC-SP2-1998-4.2-cln.first-2000-jobs.swf.gz",
    "SDSC-SP2-1998-4.2-cln.swf.gz",
    "CTC-SP2-1996-3.1-cln.swf.gz",
)

_LEADING_INT = re.compile(r"-?\d+")
# job id, submit, wait, run time, allocated procs, requested procs, requested time, status, queue,
# partition (0-based field positions); the other eight fields play no part in a replay
_USED_FIELDS = itemgetter(0, 1, 2, 3, 4, 7, 8, 10, 14, 15)


class SwfFormatError(ValueError):
    """The file cannot be read at all (damaged compressed data).

    Text that is not SWF is no error: its lines are counted as malformed, and a caller that got no
    jobs says so.
    """


class SwfJob(NamedTuple):
    """One runnable job. Times are seconds from the header's UnixStartTime; None = not recorded."""

    job_id: int
    submit: int
    wait: int | None
    run_time: int
    procs: int  # processors the job needs: requested, or allocated when the request is unknown
    allocated_procs: int | None
    requested_procs: int | None
    requested_time: int | None
    status: int | None
    queue: int | None
    partition: int | None


@dataclass(slots=True)
class SwfHeader:
    """The header fields a replay needs, plus every raw comment line (they carry the licence)."""

    computer: str | None = None
    installation: str | None = None
    max_nodes: int | None = None
    max_procs: int | None = None
    unix_start_time: int | None = None
    time_zone_string: str | None = None
    lines: list[str] = field(default_factory=list)

    def read(self, line: str) -> None:
        """Take one `;` line: keep it, and pick out the fields we know."""
        self.lines.append(line)
        key, sep, value = line[1:].partition(":")
        if not sep:
            return
        key, value = key.strip(), value.strip()
        if key == "Computer":
            self.computer = value
        elif key == "Installation":
            self.installation = value
        elif key == "TimeZoneString":
            self.time_zone_string = value
        elif key in ("MaxNodes", "MaxProcs", "UnixStartTime"):
            # "MaxNodes: 338 (batch partition; 512 total)" -> 338
            match = _LEADING_INT.match(value)
            number = int(match.group()) if match else None
            if key == "MaxNodes":
                self.max_nodes = number
            elif key == "MaxProcs":
                self.max_procs = number
            else:
                self.unix_start_time = number


@dataclass(slots=True)
class SkipCounts:
    """Lines that did not become jobs, by cause, with the first few explained by line number."""

    cancelled: int = 0  # status 5 and no run time: the job never ran
    no_run_time: int = 0  # run time -1 with another status
    no_size: int = 0  # neither requested nor allocated processors recorded
    no_submit: int = 0  # submit time -1
    malformed: int = 0  # wrong field count, not a number, negative where -1 is the only negative
    problems: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.cancelled + self.no_run_time + self.no_size + self.no_submit + self.malformed

    def note(self, line_number: int, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"line {line_number}: {message}")


def _number(text: str) -> int:
    """An SWF field as an int, for the traces that write integers as '142.00'."""
    try:
        return int(text)
    except ValueError:
        return round(float(text))


class SwfReader:
    """Reads the header eagerly, so MaxNodes is known before the first job, then jobs lazily.

    Iterate once: iterating consumes the lines.
    """

    def __init__(self, lines: Iterable[str]) -> None:
        self.header = SwfHeader()
        self.skipped = SkipCounts()
        self._lines = enumerate(lines, start=1)
        self._first: tuple[int, str] | None = None
        for number, line in self._lines:
            stripped = line.strip()
            if stripped.startswith(";"):
                self.header.read(stripped)
            elif stripped:
                self._first = (number, stripped)
                break

    def __iter__(self) -> Iterator[SwfJob]:
        if self._first is not None:
            first, self._first = self._first, None
            job = self._parse(*first)
            if job is not None:
                yield job
        for number, line in self._lines:
            stripped = line.strip()
            if not stripped or stripped[0] == ";":
                continue
            job = self._parse(number, stripped)
            if job is not None:
                yield job

    def _parse(self, number: int, line: str) -> SwfJob | None:
        skipped = self.skipped
        parts = line.split()
        if len(parts) != FIELDS:
            skipped.malformed += 1
            skipped.note(number, f"expected {FIELDS} fields, found {len(parts)}")
            return None
        fields = _USED_FIELDS(parts)
        try:
            values = tuple(map(int, fields))
        except ValueError:
            try:
                values = tuple(map(_number, fields))
            except ValueError:
                skipped.malformed += 1
                skipped.note(number, "a field is not a number")
                return None
        job_id, submit, wait, run_time, allocated, requested, requested_time = values[:7]
        status, queue, partition = values[7:]
        if min(job_id, submit, wait, run_time, allocated, requested, requested_time) < -1:
            skipped.malformed += 1
            skipped.note(number, "a negative value other than -1")
            return None
        if submit == -1:
            skipped.no_submit += 1
            skipped.note(number, f"job {job_id} has no submit time")
            return None
        if run_time == -1:
            if status == CANCELLED:
                skipped.cancelled += 1
            else:
                skipped.no_run_time += 1
                skipped.note(number, f"job {job_id} has no run time")
            return None
        procs = requested if requested > 0 else allocated
        if procs <= 0:
            skipped.no_size += 1
            skipped.note(number, f"job {job_id} has no processor count")
            return None
        return SwfJob(
            job_id=job_id,
            submit=submit,
            wait=None if wait == -1 else wait,
            run_time=run_time,
            procs=procs,
            allocated_procs=None if allocated == -1 else allocated,
            requested_procs=None if requested == -1 else requested,
            requested_time=None if requested_time == -1 else requested_time,
            status=None if status == -1 else status,
            queue=None if queue == -1 else queue,
            partition=None if partition == -1 else partition,
        )


@contextmanager
def open_swf(path: str | os.PathLike[str] | Traversable) -> Iterator[SwfReader]:
    """Open a plain or gzipped SWF file (or a bundled trace) and read its header."""
    source = Path(path) if isinstance(path, str | os.PathLike) else path
    with source.open("rb") as raw:
        gzipped = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        binary = gzip.GzipFile(fileobj=raw) if gzipped else raw
        with io.TextIOWrapper(binary, encoding="ascii", errors="replace") as text:
            try:
                yield SwfReader(text)
            except (gzip.BadGzipFile, EOFError) as exc:
                raise SwfFormatError(f"{path}: damaged gzip data: {exc}") from exc


def bundled_trace(name: str) -> Traversable:
    """A trace shipped with the package; the product never reads traces from outside it."""
    if name not in BUNDLED_TRACES:
        raise ValueError(f"unknown bundled trace {name!r}; choose one of {BUNDLED_TRACES}")
    return resources.files("services.autogrow").joinpath("traces", name)
