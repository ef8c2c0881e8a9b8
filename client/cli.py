"""Command line: `python -m client embed|info|similarity ...`. Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from client.connection import DEFAULT_TARGET, Tls
from client.embed_client import EmbedClient
from client.errors import EmbedError
from client.files import (
    EmbeddingWriter,
    InputError,
    Record,
    check_not_in_use,
    count_texts,
    jsonl_format,
    open_input,
    open_output,
    read_records,
)
from client.options import Encoding, LongTextMode, Task
from client.results import row_width
from client.run_record import OtherInput, PartRefused, RunRecord

TOKEN_ENV = "NOMIC_EMBED_TOKEN"
TARGET_ENV = "NOMIC_EMBED_TARGET"
_OUTPUT_DTYPES = {Encoding.FLOAT32: np.float32, Encoding.VALUES: np.float32, Encoding.FLOAT16: np.float16,
                  Encoding.INT8: np.int8, Encoding.UBINARY: np.uint8}


def _names(kind: type[Task] | type[Encoding] | type[LongTextMode]) -> list[str]:
    return [m.name.lower() for m in kind]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=os.environ.get(TARGET_ENV, DEFAULT_TARGET),
                        help="host:port, several comma-separated, or a gRPC target such as dns:///name:port "
                             f"(default: ${TARGET_ENV} or {DEFAULT_TARGET})")
    common.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    common.add_argument("--ca", metavar="PEM", help="root certificates for TLS (implies --tls)")
    common.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,  # set but empty = unset
                        help=f"bearer token sent as 'authorization' metadata (default: ${TOKEN_ENV})")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds per unary call (default 60)")

    parser = argparse.ArgumentParser(prog="python -m client", description="Client of nomic-embed-grpc.")
    commands = parser.add_subparsers(dest="command", required=True)

    embed = commands.add_parser("embed", parents=[common], help="embed a file of texts into .npy or .jsonl")
    embed.add_argument("--input", required=True, help="text lines or JSONL objects; - reads stdin")
    embed.add_argument("--output", required=True, help="out.npy (one row per text) or out.jsonl")
    embed.add_argument("--task", default="search_document", choices=_names(Task))
    embed.add_argument("--dimensions", type=int, default=0, help="Matryoshka width; 0 = full width")
    embed.add_argument("--encoding", default="float32", choices=_names(Encoding),
                       help="wire and output format (int8: q/127 approximates x; ubinary: packed sign bits)")
    embed.add_argument("--format", default="auto", choices=["auto", "lines", "jsonl"],
                       help="input format; auto: JSONL for a .jsonl/.ndjson input, or when the first line is "
                            "an object with --text-field")
    embed.add_argument("--text-field", default="text", help="the text's key in JSONL input (default text)")
    embed.add_argument("--long-text-mode", default="truncate", choices=_names(LongTextMode))
    embed.add_argument("--max-tokens", type=int, default=0, help="token limit per text; 0 = the server's")
    embed.add_argument("--batch-size", type=int, default=64, help="texts per request (default 64)")
    embed.add_argument("--window", type=int, default=4, help="requests in flight (default 4)")
    embed.add_argument("--streams", type=int, default=1, help="concurrent streams, e.g. one per server")
    embed.add_argument("--reconnect-timeout", type=float, default=60.0,
                       help="seconds to wait for a server when the stream breaks, e.g. during a restart, or "
                            "while it refuses a batch as overloaded (default 60)")
    embed.add_argument("--answer-timeout", type=float, default=None,
                       help="seconds without an answer, with batches in flight, after which the stream is reopened "
                            "(a server that answers pings but not the stream); default: wait, as for a deep queue")
    embed.add_argument("--resume", action="store_true",
                       help="continue the OUTPUT.part a failed or interrupted run left: skip the texts it holds")
    embed.add_argument("--quiet", action="store_true", help="no progress bar")
    embed.set_defaults(run=run_embed)

    info = commands.add_parser("info", parents=[common], help="describe the served model and limits")
    info.set_defaults(run=run_info)

    similarity = commands.add_parser("similarity", parents=[common], help="cosine similarity of two texts")
    similarity.add_argument("a")
    similarity.add_argument("b")
    similarity.add_argument("--task", default="clustering", choices=_names(Task),
                            help="task prefix for both texts (default clustering: a symmetric comparison)")
    similarity.set_defaults(run=run_similarity)
    return parser


def _client(args: argparse.Namespace) -> EmbedClient:
    if args.token == "":
        raise ValueError("--token is empty; leave it out to send no token")
    tls = Tls.from_files(ca=args.ca) if args.ca else (True if args.tls else None)
    return EmbedClient(args.target, timeout=args.timeout, tls=tls, token=args.token)


def run_info(args: argparse.Namespace) -> None:
    with _client(args) as client:
        info = client.info()
    for name, value in vars(info).items():
        print(f"{name}: {value}")


def run_similarity(args: argparse.Namespace) -> None:
    with _client(args) as client:
        a, b = client.embed([args.a, args.b], args.task)
    print(f"{float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))):.4f}")


def run_embed(args: argparse.Namespace) -> None:
    encoding = Encoding[args.encoding.upper()]
    jsonl = jsonl_format(args.input, args.format)
    with _client(args) as client, open_input(args.input) as lines:
        info = client.info()  # fails fast, with a clear message, when no server answers
        width = row_width(int(encoding), args.dimensions or info.dimensions)
        total = count_texts(args.input)
        items = read_records(lines, jsonl=jsonl, text_field=args.text_field)
        # (line, record) of each text read and not yet written: written in order, named by line in errors.
        pending: collections.deque[tuple[int, Record]] = collections.deque()
        # Made first, so that bad options are refused before any output file is touched; reads nothing yet.
        stream = client.embed_stream(
            _texts_keeping_records(items, pending.append), args.task, args.dimensions, encoding=encoding,
            long_text_mode=args.long_text_mode, max_tokens=args.max_tokens, batch_size=args.batch_size,
            window=args.window, streams=args.streams, reconnect_timeout=args.reconnect_timeout,
            answer_timeout=args.answer_timeout)
        record = RunRecord(Path(args.output + ".part"), _run_params(args, jsonl))
        check_not_in_use(record.part)  # before any advice to resume or remove it
        if args.resume:
            record.check_resume()  # before the part is opened: another run's part is left as it is
        writer = open_output(args.output, np.dtype(_OUTPUT_DTYPES[encoding]), width, resume=args.resume)
        if not getattr(writer, "resumed", False):
            try:
                record.created()
            except BaseException:  # e.g. a full disk: a part without its record would block the next run
                writer.stop()
                record.remove()
                raise
        done = 0
        try:
            done = _skip_done(items, writer)
            if done:  # said even with --quiet: the output holds rows this run did not compute
                print(f"resuming after {done:,} texts already in {writer.part}", file=sys.stderr)
            with stream, tqdm(total=total, initial=done, unit="text", unit_scale=True, disable=args.quiet,
                              file=sys.stderr) as bar:
                started, tokens = time.monotonic(), 0
                for batch in stream:
                    # The first answer's model is recorded before any row; each later one must be the same.
                    record.answered(batch.model)
                    writer.write([pending.popleft()[1] for _ in batch.texts], batch.embeddings)
                    tokens += batch.total_tokens
                    bar.set_postfix_str(f"{tokens / max(time.monotonic() - started, 1e-9):,.0f} tokens/s",
                                        refresh=False)
                    bar.update(len(batch.texts))
        except BaseException as error:
            named = error
            if isinstance(error, EmbedError) and not isinstance(error, PartRefused):
                named = _in_the_input(error, done, writer.rows - done, pending)
            if writer.stop():
                if not isinstance(error, PartRefused):  # whose message says to remove the part instead
                    named.add_note(f"{writer.rows:,} texts are done and kept in {writer.part}; "
                                   "run the same command with --resume to continue from there")
            else:
                record.remove()
            if named is not error:
                raise named from None
            raise
        record.remove()  # before the part becomes OUTPUT: a next run's part and record may follow at once
        writer.finish()


def _run_params(args: argparse.Namespace, jsonl: bool | None) -> dict[str, object]:
    """What makes two runs' rows belong to one output (recorded beside OUTPUT.part for --resume)."""
    return {"task": args.task, "dimensions": args.dimensions, "long_text_mode": args.long_text_mode,
            "max_tokens": args.max_tokens, "encoding": args.encoding, "output_format": Path(args.output).suffix,
            "input_format": {None: "auto", True: "jsonl", False: "lines"}[jsonl], "text_field": args.text_field}


def _skip_done(items: Iterator[tuple[str, Record, int]], writer: EmbeddingWriter) -> int:
    """Read past the input a resumed output already holds; refuse an output that is not this input's."""
    done = 0
    for _, record, _ in itertools.islice(items, writer.rows):
        if not writer.continues(done, record):
            raise OtherInput(f"{writer.part} does not continue this input (its text {done + 1:,} is another); "
                             "remove it to start over")
        done += 1
    if done < writer.rows:
        raise OtherInput(f"{writer.part} holds {writer.rows:,} texts but the input has only {done:,}: it does not "
                         "continue this input; remove it to start over")
    return done


def _texts_keeping_records(items: Iterator[tuple[str, Record, int]],
                           keep: Callable[[tuple[int, Record]], None]) -> Iterator[str]:
    for text, record, number in items:
        keep((number, record))
        yield text


_TEXT_INDEX = re.compile(r"texts\[(\d+)(?:\.\.(\d+))?\]")  # one text, or a batch's range


def _in_the_input(error: EmbedError, done: int, written: int, pending: collections.deque[tuple[int, Record]]
                  ) -> EmbedError:
    """`error` with its texts[i] named as in the whole input, with their lines: the stream counts only the texts
    this run sent, after the `done` a resumed output held, of which `written` are written and `pending` follow."""
    def name(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if match.group(2) is not None:
            return f"texts[{index + done}..{int(match.group(2)) + done}]"
        line = f" (line {pending[index - written][0]})" if 0 <= index - written < len(pending) else ""
        return f"texts[{index + done}]{line}"

    if not _TEXT_INDEX.search(error.details):
        return error
    renamed = EmbedError(error.code, _TEXT_INDEX.sub(name, error.details),
                         field=_TEXT_INDEX.sub(lambda m: f"texts[{int(m.group(1)) + done}]", error.field)
                         if error.field.startswith("texts[") else error.field,
                         retry_after_s=error.retry_after_s)
    renamed.__notes__ = list(getattr(error, "__notes__", []))
    return renamed


def _describe(error: EmbedError, target: str) -> str:
    where = f" (is a server running at {target}?)" if error.code is grpc.StatusCode.UNAVAILABLE else ""
    return f"{error.code.name}: {error.details}{where}"


def _notes(error: BaseException) -> None:
    for note in getattr(error, "__notes__", ()):
        print(note, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
        sys.stdout.flush()  # here, so that a reader that went away is met below, not at exit
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): end as quietly as a process that SIGPIPE ended. Further
        # output (the interpreter flushes stdout at exit) goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except EmbedError as error:
        print(f"error: {_describe(error, args.target)}", file=sys.stderr)
        _notes(error)
        return 1
    except (InputError, OSError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        _notes(error)
        return 1
    except KeyboardInterrupt as interrupt:
        print("interrupted", file=sys.stderr)
        _notes(interrupt)
        return 130
    return 0
