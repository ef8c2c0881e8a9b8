"""The client's pure parts: batching, retry timing, connection targets, input and output files."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from client.batching import BatchLimits, batches, estimate_tokens
from client.checks import ModelGuard, checked_embeddings
from client.connection import connect
from client.errors import EmbedError
from client.files import InputError, JsonlWriter, NpyWriter, count_texts, read_records, text_lines
from client.options import EmbedOptions, text_list
from client.retry import Deadline, RetryPolicy
from nomic_embed.v1 import embed_pb2 as pb


def split(texts: list[str], limits: BatchLimits) -> list[tuple[int, list[str]]]:
    async def collect() -> list[tuple[int, list[str]]]:
        return [b async for b in batches(texts, limits)]

    return asyncio.run(collect())


def test_batches_close_on_count_and_on_estimated_tokens() -> None:
    assert split([f"t{i}" for i in range(7)], BatchLimits(max_texts=3)) == [
        (0, ["t0", "t1", "t2"]), (3, ["t3", "t4", "t5"]), (6, ["t6"])]
    long = "x" * 400  # about 108 estimated tokens
    assert estimate_tokens(long) == 108
    got = split(["a", "b", long, "c", long, long], BatchLimits(max_texts=10, max_tokens=120))
    assert got == [(0, ["a", "b"]), (2, [long, "c"]), (4, [long]), (5, [long])]
    assert split(["x" * 10_000], BatchLimits(max_tokens=100)) == [(0, ["x" * 10_000])]  # alone, not dropped


def test_batches_refuse_what_is_not_text() -> None:
    with pytest.raises(TypeError, match=r"texts\[1\] is an int"):
        split(["a", 3], BatchLimits())  # type: ignore[list-item]
    # A lone surrogate (legal in JSON, "\\ud800"): protobuf would refuse it while sending, naming no text.
    with pytest.raises(ValueError, match=r"^texts\[100\] is not valid Unicode: a lone surrogate at character 4 "):
        split([*(f"text {i}" for i in range(100)), "bad \ud800 text"], BatchLimits())


def test_a_request_refuses_bytes_and_lone_surrogates_naming_the_text() -> None:
    with pytest.raises(TypeError, match=r"^texts must be a str or a sequence of str, not bytes$"):
        text_list(b"hello")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^texts\[1\] is not valid Unicode"):
        text_list(["caf\u00e9", "a\ud800b"])
    assert text_list(["caf\u00e9", "\U0001f600"]) == ["caf\u00e9", "\U0001f600"]


def test_retry_honours_the_server_hint_and_gives_up_when_it_must() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, max_backoff_s=0.3)
    busy = EmbedError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_after_s=2.0)
    away = EmbedError(grpc.StatusCode.UNAVAILABLE, "restarting")
    forever = Deadline(None)
    assert all(2.0 <= policy.next_delay(busy, 1, forever) <= 2.4 for _ in range(50))  # type: ignore[operator]
    assert all(0.05 <= policy.next_delay(away, 1, forever) <= 0.1 for _ in range(50))  # type: ignore[operator]
    assert all(0.1 <= policy.next_delay(away, 2, forever) <= 0.2 for _ in range(50))  # type: ignore[operator]
    assert policy.next_delay(away, 3, forever) is None  # out of attempts
    assert policy.next_delay(busy, 1, Deadline(1.0)) is None  # the hint would pass the deadline
    assert policy.next_delay(EmbedError(grpc.StatusCode.INVALID_ARGUMENT, "bad"), 1, forever) is None


def test_several_addresses_become_one_round_robin_target() -> None:
    c = connect("127.0.0.1:5001, 127.0.0.1:5002", token="secret")
    options = dict(c.options)
    assert c.target == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert json.loads(options["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert c.metadata == (("authorization", "Bearer secret"),)
    assert options["grpc.max_receive_message_length"] >= 64 * 1024 * 1024
    assert "round_robin" in dict(connect("dns:///embed.internal:50051").options)["grpc.service_config"]
    assert "grpc.service_config" not in dict(connect("localhost:50051").options)
    assert connect(["[::1]:5001", "[::1]:5002"]).target == "ipv6:[::1]:5001,[::1]:5002"
    with pytest.raises(ValueError, match="not host:port"):
        connect(["127.0.0.1:5001", "127.0.0.1"])


def test_input_lines_and_jsonl_are_told_apart() -> None:
    lines = list(read_records(io.StringIO("first\n\nsecond\r\n"), jsonl=None))
    assert lines == [("first", {"text": "first"}, 1), ("second", {"text": "second"}, 3)]
    records = list(read_records(io.StringIO('{"id": 7, "body": "hi"}\n'), jsonl=None, text_field="body"))
    assert records == [("hi", {"id": 7, "body": "hi"}, 1)]
    with pytest.raises(InputError, match="line 2: expected a JSON object"):
        list(read_records(io.StringIO('{"text": "a"}\n{"txt": "b"}\n'), jsonl=None))
    with pytest.raises(InputError, match="line 3: 'text' is not valid Unicode: a lone surrogate at character 2"):
        list(read_records(io.StringIO('{"text": "a"}\n\n{"text": "ok\\ud800"}\n'), jsonl=None))


def test_npy_writer_writes_the_final_row_count(tmp_path: Path) -> None:
    path = tmp_path / "out.npy"
    writer = NpyWriter(path, np.dtype(np.int8), 4)
    rows = np.arange(24, dtype=np.int8).reshape(6, 4)
    writer.write([{}] * 2, rows[:2])
    writer.write([{}] * 4, rows[2:])
    assert not path.exists()  # only PATH.part until finished
    writer.finish()
    assert np.array_equal(np.load(path), rows)


def test_text_lines_drop_line_ends_a_bom_and_blank_lines() -> None:
    lines = io.StringIO("\ufeffone\r\ntwo\n\n  \t\nthree\n\n", newline="")
    assert list(text_lines(lines)) == [(1, "one"), (2, "two"), (5, "three")]
    assert list(text_lines(["\ufeff\n", "x\ufeff\n"])) == [(2, "x\ufeff")]  # a BOM only at the very start
    records = list(read_records(io.StringIO('\ufeff{"text": "a"}\n'), jsonl=None))
    assert records == [("a", {"text": "a"}, 1)]


@pytest.mark.parametrize("line", [3, 400, 5000])  # in the first chunk the file is decoded in, and later
def test_a_file_that_is_not_utf8_is_named_with_the_line(tmp_path: Path, line: int) -> None:
    latin1 = tmp_path / "in.txt"
    rows = [f"line {n} of the input".encode() for n in range(1, 6001)]
    rows[line - 1] = b"caf\xe9"
    latin1.write_bytes(b"\n".join(rows) + b"\n")
    with open(latin1, encoding="utf-8", newline="\n") as lines, pytest.raises(InputError) as caught:
        list(text_lines(lines))
    assert str(caught.value).startswith(f"{latin1}: line {line} is not UTF-8 text: byte 0xe9 at byte 4 of the line")
    with pytest.raises(InputError, match=r"^the input is not UTF-8 text: byte 0xe9 "):  # a stream: no name to reread
        list(text_lines(io.TextIOWrapper(io.BytesIO(latin1.read_bytes()), encoding="utf-8", newline="\n")))


def test_npy_resume_tells_another_input_by_any_kept_row(tmp_path: Path) -> None:
    """A .npy row holds no text: the hash of each row's record, kept beside the part, tells a resume over
    another input file, or one changed within the rows done, which would otherwise complete the output with
    rows of two inputs."""
    path = tmp_path / "out.npy"
    records = [{"text": f"line {i} of input A"} for i in range(5)]
    writer = NpyWriter(path, np.dtype(np.float32), 4)
    writer.write(records[:3], np.ones((3, 4), np.float32))
    writer.hashes.write(b"\0" * 8)  # a run killed after a batch's hashes, before its rows
    assert writer.stop() and writer.hashes_path.exists()
    resumed = NpyWriter(path, np.dtype(np.float32), 4, resume=True)
    assert resumed.rows == 3 and all(resumed.continues(i, record) for i, record in enumerate(records[:3]))
    assert not resumed.continues(2, {"text": "line 2 of input B"})
    assert not resumed.continues(0, {"text": "line 0, changed since"})
    resumed.write(records[3:], np.ones((2, 4), np.float32))
    resumed.finish()
    assert np.load(path).shape == (5, 4) and not resumed.hashes_path.exists()


def test_npy_resume_keeps_complete_rows_and_drops_a_cut_one(tmp_path: Path) -> None:
    path = tmp_path / "out.npy"
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    writer = NpyWriter(path, np.dtype(np.float32), 4)
    writer.write([{}] * 6, rows[:6])
    assert np.array_equal(np.load(writer.part), rows[:6])  # readable after every batch
    with open(writer.part, "ab") as f:  # a run killed in the middle of a row
        f.write(rows[6].tobytes()[:6])
    writer.file.close()
    with pytest.raises(InputError, match="add --resume to continue it"):
        NpyWriter(path, np.dtype(np.float32), 4)
    with pytest.raises(InputError, match="this run writes float32 rows of 8"):
        NpyWriter(path, np.dtype(np.float32), 8, resume=True)
    resumed = NpyWriter(path, np.dtype(np.float32), 4, resume=True)
    assert resumed.rows == 6
    resumed.write([{}] * 4, rows[6:])
    resumed.finish()
    assert np.array_equal(np.load(path), rows)


def test_npy_resume_keeps_only_rows_with_a_hash(tmp_path: Path) -> None:
    """Hashes are written before their rows: a row without one (bytes appended by anything but this client, a
    torn write) is dropped, and a part whose hashes are missing is refused, never resumed unchecked."""
    path = tmp_path / "out.npy"
    rows = np.arange(1, 21, dtype=np.float32).reshape(5, 4)
    records = [{"text": f"line {i}"} for i in range(5)]
    writer = NpyWriter(path, np.dtype(np.float32), 4)
    writer.write(records[:3], rows[:3])
    with open(writer.part, "ab") as f:
        f.write(bytes(16))  # one whole row of zeros, with no hash
    assert writer.stop()
    resumed = NpyWriter(path, np.dtype(np.float32), 4, resume=True)
    assert resumed.rows == 3
    resumed.stop()
    hashes = resumed.hashes_path.read_bytes()
    resumed.hashes_path.write_bytes(hashes[:16])  # a hash lost: its row goes too
    resumed = NpyWriter(path, np.dtype(np.float32), 4, resume=True)
    assert resumed.rows == 2 and not resumed.continues(0, {"text": "another line"})
    resumed.write(records[2:], rows[2:])
    resumed.stop()
    resumed.hashes_path.unlink()
    with pytest.raises(InputError, match=r"out\.npy\.part\.texts, the record of the texts its rows are of, is missing"):
        NpyWriter(path, np.dtype(np.float32), 4, resume=True)
    resumed.hashes_path.write_bytes(hashes[:8] * 5)  # put back: the part is as it was
    resumed = NpyWriter(path, np.dtype(np.float32), 4, resume=True)
    resumed.finish()
    assert np.array_equal(np.load(path), rows)


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_a_second_run_on_one_output_is_refused_while_the_first_writes(tmp_path: Path, suffix: str) -> None:
    """Two runs appending to one part interleave their rows: the part is locked while a run holds it."""
    def writer(resume: bool = False) -> NpyWriter | JsonlWriter:
        if suffix == ".npy":
            return NpyWriter(tmp_path / "out.npy", np.dtype(np.float32), 4, resume)
        return JsonlWriter(tmp_path / "out.jsonl", resume)

    first = writer()
    first.write([{"text": "a"}, {"text": "b"}], np.ones((2, 4), np.float32))
    for resume in (True, False):  # not "left by an earlier run: remove it", while it is being written
        with pytest.raises(InputError, match="is being written by another run of this output"):
            writer(resume=resume)
    first.write([{"text": "c"}], np.ones((1, 4), np.float32))
    assert first.stop()
    second = writer(resume=True)  # the first has ended: its part is this run's to continue
    assert second.rows == 3
    second.finish()
    third = writer(resume=True)  # no part any more: a run from the beginning, not the finished output
    assert third.rows == 0
    third.stop()
    third.part.symlink_to(tmp_path / "gone")
    with pytest.raises(InputError, match="is a link to nothing: remove it"):
        writer(resume=True)


def test_jsonl_resume_drops_a_cut_line_and_knows_its_last_record(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    writer = JsonlWriter(path)
    writer.write([{"id": 1}, {"id": 2}], np.zeros((2, 2), np.float32))
    with open(writer.part, "ab") as f:
        f.write(b'{"id": 3, "emb')
    writer.file.close()
    resumed = JsonlWriter(path, resume=True)
    assert resumed.rows == 2
    assert resumed.continues(1, {"id": 2}) and not resumed.continues(1, {"id": 3})
    resumed.write([{"id": 3}], np.ones((1, 2), np.float32))
    resumed.finish()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [1, 2, 3]


def _answer(digest: str, model: str = "m", model_digest: str = "") -> pb.EmbedResponse:
    return pb.EmbedResponse(metadata=pb.ResponseMetadata(model_id=model, variant="fp32", weights_digest=digest,
                                                         model_digest=model_digest))


def test_replicas_that_name_the_same_files_by_other_paths_are_one_model() -> None:
    """The model digest covers what decides the vectors; the model id is the path or hub id as typed."""
    guard = ModelGuard()
    guard.check(_answer("aaaa", "/models/nomic", "cccc"))
    guard.check(_answer("aaaa", "/mnt/copy/nomic", "cccc"))  # a copy: one model
    with pytest.raises(EmbedError, match="model changed"):
        guard.check(_answer("aaaa", "/models/nomic", "dddd"))  # the same path, its config edited
    with pytest.raises(EmbedError, match="model changed"):
        guard.check(_answer("aaaa", "/mnt/copy/nomic"))  # a server that does not say: the id decides


@pytest.mark.parametrize("digests", [["aaaa", "", "bbbb"], ["", "aaaa", "bbbb"], ["", "", "aaaa", "", "bbbb"]])
def test_the_model_guard_refuses_other_weights_whichever_answer_names_them_first(digests: list[str]) -> None:
    """Answers of a server that does not say its digest are compared by model and variant; the first digest
    any answer gives is held to."""
    guard = ModelGuard()
    for digest in digests[:-1]:
        guard.check(_answer(digest))
    with pytest.raises(EmbedError) as caught:
        guard.check(_answer(digests[-1]))
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "from m (variant fp32, weights aaaa) to m (variant fp32, weights bbbb)" in caught.value.details
    with pytest.raises(EmbedError):
        guard.check(_answer("", model="other"))


def test_the_model_guard_holds_a_run_to_the_width_of_its_first_answer() -> None:
    """With dimensions=0 (the full width) nothing else says the width a run's rows must have."""
    guard = ModelGuard()
    answer = _answer("aaaa")
    answer.metadata.dimensions = 64
    guard.check(answer)
    guard.check(answer)
    answer.metadata.dimensions = 32
    with pytest.raises(EmbedError, match="width 32 where the run's first answer had 64") as caught:
        guard.check(answer)
    assert caught.value.code is grpc.StatusCode.DATA_LOSS


def test_a_vector_with_nan_or_infinity_is_refused_naming_its_text() -> None:
    def response(*vectors: list[float]) -> pb.EmbedResponse:
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=v) for v in vectors],
                                metadata=pb.ResponseMetadata(dimensions=2))

    options = EmbedOptions.of("search_document", 0)
    assert checked_embeddings(response([0.6, 0.8], [1.0, 0.0]), 2, options).shape == (2, 2)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(EmbedError, match="NaN or infinity for text 1") as caught:
            checked_embeddings(response([0.6, 0.8], [bad, 0.0], [1.0, 0.0]), 3, options)
        assert caught.value.code is grpc.StatusCode.DATA_LOSS


def test_only_a_regular_file_is_counted_for_the_progress_bar(tmp_path: Path) -> None:
    """A second reader of a pipe would drain it (or wait on a FIFO) before the texts are read."""
    (tmp_path / "in.txt").write_text("a\n\nb\n")
    assert count_texts(str(tmp_path / "in.txt")) == 2
    assert count_texts("-") is None
    os.mkfifo(tmp_path / "fifo")
    assert count_texts(str(tmp_path / "fifo")) is None  # returns at once: no writer is waited for


def test_a_part_that_cannot_be_started_is_not_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while writing the header left an empty OUTPUT.part that refused every later run."""
    path = tmp_path / "out.npy"

    def full(self: NpyWriter) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(NpyWriter, "_write_header", full)
    with pytest.raises(OSError, match="No space left"):
        NpyWriter(path, np.dtype(np.float32), 4)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    writer = NpyWriter(path, np.dtype(np.float32), 4)  # the next run starts
    writer.write([{"text": "a"}], np.ones((1, 4), np.float32))
    writer.finish()
    assert np.load(path).shape == (1, 4)
