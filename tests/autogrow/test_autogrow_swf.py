"""The SWF reader: header fields, -1 fields, skipped lines counted and explained, bundled traces."""

from __future__ import annotations

import gzip
from itertools import pairwise
from pathlib import Path

import pytest

from services.autogrow.swf import (
    BUNDLED_TRACES,
    SwfFormatError,
    SwfJob,
    SwfReader,
    bundled_trace,
    open_swf,
)

HEADER = """\
; Version: 2.2
; Computer: IBM SP2
; Installation: Cornell Theory Center (CTC)
; UnixStartTime: 835823160
; TimeZoneString: US/Eastern
; MaxNodes: 338 (batch partition; 512 total)
; MaxProcs: 338
;
"""


def line(
    job_id: int = 1,
    submit: int = 10,
    wait: int = 5,
    run: int = 100,
    allocated: int = 4,
    requested: int = 4,
    requested_time: int = 600,
    status: int = 1,
    queue: int = 3,
    partition: int = -1,
) -> str:
    fields = [job_id, submit, wait, run, allocated, -1, -1, requested, requested_time, -1, status]
    fields += [7, 2, 11, queue, partition, -1, -1]
    return " ".join(str(f) for f in fields)


def read(text: str) -> tuple[SwfReader, list[SwfJob]]:
    reader = SwfReader(text.splitlines(keepends=True))
    return reader, list(reader)


def test_header_fields_are_read_before_the_first_job() -> None:
    reader = SwfReader((HEADER + line() + "\n").splitlines())
    header = reader.header
    assert (header.max_nodes, header.max_procs) == (338, 338)
    assert header.unix_start_time == 835823160
    assert header.computer == "IBM SP2"
    assert header.installation == "Cornell Theory Center (CTC)"
    assert header.time_zone_string == "US/Eastern"
    assert header.lines[0] == "; Version: 2.2"
    assert len(list(reader)) == 1


def test_a_header_without_max_nodes_leaves_it_unknown() -> None:
    reader, jobs = read("; Computer: somewhere\n" + line())
    assert reader.header.max_nodes is None
    assert reader.header.max_procs is None
    assert len(jobs) == 1


def test_fields_of_a_complete_job() -> None:
    _, [job] = read(HEADER + line(job_id=7, submit=20, wait=3, run=50, partition=2))
    assert job == SwfJob(
        job_id=7,
        submit=20,
        wait=3,
        run_time=50,
        procs=4,
        allocated_procs=4,
        requested_procs=4,
        requested_time=600,
        status=1,
        queue=3,
        partition=2,
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"requested": -1, "allocated": 16}, {"procs": 16, "requested_procs": None}),
        ({"requested": 8, "allocated": -1}, {"procs": 8, "allocated_procs": None}),
        ({"requested": 8, "allocated": 6}, {"procs": 8}),
        ({"wait": -1}, {"wait": None}),
        ({"requested_time": -1}, {"requested_time": None}),
        ({"status": -1, "queue": -1}, {"status": None, "queue": None}),
        ({"status": 5, "run": 30}, {"status": 5, "run_time": 30}),  # cancelled after running
        ({"run": 0}, {"run_time": 0}),
    ],
)
def test_unknown_fields(fields: dict[str, int], expected: dict[str, object]) -> None:
    _, [job] = read(line(**fields))
    for name, value in expected.items():
        assert getattr(job, name) == value


def test_integers_written_as_decimals_are_accepted() -> None:
    _, [job] = read("1 0 588530 937.00 306 142.00 -1 -1 35100 -1 1 97 -1 307 3 -1 -1 -1")
    assert (job.run_time, job.procs, job.requested_procs) == (937, 306, None)


@pytest.mark.parametrize(
    ("bad", "cause", "explained"),
    [
        (line(status=5, run=-1, allocated=-1, requested=-1), "cancelled", False),
        (line(status=1, run=-1), "no_run_time", True),
        (line(allocated=-1, requested=-1), "no_size", True),
        (line(allocated=0, requested=-1), "no_size", True),
        (line(submit=-1), "no_submit", True),
        ("1 2 3", "malformed", True),
        (line() + " 99", "malformed", True),
        (line().replace(" 600 ", " ten "), "malformed", True),
        (line(run=-5), "malformed", True),
    ],
)
def test_lines_that_cannot_run_are_skipped_counted_and_explained(
    bad: str, cause: str, explained: bool
) -> None:
    reader, jobs = read(f"{HEADER}{line(job_id=1)}\n{bad}\n{line(job_id=3)}\n")
    assert [job.job_id for job in jobs] == [1, 3]
    assert getattr(reader.skipped, cause) == 1
    assert reader.skipped.total == 1
    bad_line_number = HEADER.count("\n") + 2
    if explained:
        assert reader.skipped.problems == [reader.skipped.problems[0]]
        assert reader.skipped.problems[0].startswith(f"line {bad_line_number}:")
    else:
        assert reader.skipped.problems == []


def test_problem_messages_are_capped_but_every_skip_is_counted() -> None:
    reader, jobs = read("\n".join("garbage" for _ in range(500)))
    assert jobs == []
    assert reader.skipped.malformed == 500
    assert len(reader.skipped.problems) == 20


def test_empty_input_and_blank_lines() -> None:
    reader, jobs = read("")
    assert jobs == [] and reader.skipped.total == 0
    reader, jobs = read("\n\n" + HEADER + "\n" + line() + "\n\n; trailing comment\n")
    assert len(jobs) == 1 and reader.header.max_nodes == 338


@pytest.mark.parametrize("compress", [False, True])
def test_open_swf_reads_plain_and_gzipped_files(tmp_path: Path, compress: bool) -> None:
    text = HEADER + line(job_id=1) + "\n" + line(job_id=2) + "\n"
    path = tmp_path / ("trace.swf.gz" if compress else "trace.swf")
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    with open_swf(path) as reader:
        assert reader.header.max_nodes == 338
        assert [job.job_id for job in reader] == [1, 2]


def test_a_binary_file_is_all_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "picture.png"
    path.write_bytes(bytes(range(256)) * 8)
    with open_swf(path) as reader:
        assert list(reader) == []
        assert reader.skipped.malformed > 0


def test_damaged_gzip_data_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "trace.swf.gz"
    text = HEADER + "".join(line(job_id=i, submit=i * 7, run=i * 13) + "\n" for i in range(2000))
    packed = gzip.compress(text.encode())
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(SwfFormatError), open_swf(path) as reader:
        list(reader)


def test_the_bundled_slice_keeps_its_header_and_provenance() -> None:
    with open_swf(bundled_trace("SDSC-SP2-1998-4.2-cln.first-2000-jobs.swf.gz")) as reader:
        jobs = list(reader)
    header = reader.header
    assert (header.max_nodes, header.max_procs, header.unix_start_time) == (128, 128, 893466664)
    text = "\n".join(header.lines)
    assert "JOBLOG Repository Data Usage Agreement" in text
    assert "doi:10.1016/j.jpdc.2014.06.013" in text
    assert len(jobs) + reader.skipped.total == 2000
    assert reader.skipped.total == reader.skipped.cancelled
    assert all(later.submit >= earlier.submit for earlier, later in pairwise(jobs))


@pytest.mark.parametrize(
    ("name", "jobs", "cancelled", "max_nodes"),
    [
        ("SDSC-SP2-1998-4.2-cln.swf.gz", 54044, 5671, 128),
        ("CTC-SP2-1996-3.1-cln.swf.gz", 77222, 0, 338),
    ],
)
def test_the_bundled_full_traces_match_the_archive_counts(
    name: str, jobs: int, cancelled: int, max_nodes: int
) -> None:
    with open_swf(bundled_trace(name)) as reader:
        assert sum(1 for _ in reader) == jobs
    assert reader.skipped.cancelled == cancelled
    assert reader.skipped.total == cancelled
    assert reader.header.max_nodes == max_nodes


def test_every_bundled_trace_exists_and_unknown_names_are_refused() -> None:
    for name in BUNDLED_TRACES:
        assert bundled_trace(name).is_file()
    with pytest.raises(ValueError, match="unknown bundled trace"):
        bundled_trace("../../../etc/passwd")
