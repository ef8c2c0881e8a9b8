"""OUTPUT.part.json: the parameters of the run that wrote OUTPUT.part, so that --resume continues only the
same run (the same task, width, encoding, long-text handling, input format, and the same model, variant and
weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grpc

from client.checks import describe_model, held_to, same_model
from client.errors import EmbedError
from client.files import InputError
from client.results import Model

_MODEL_KEYS = ("model_id", "variant", "weights_digest", "model_digest")


class PartRefused(Exception):
    """OUTPUT.part is another run's (other parameters, input or model): the message says to remove it, so no
    advice to --resume it is added."""


class OtherInput(PartRefused, InputError):
    pass


class OtherModel(PartRefused, EmbedError):
    pass


class RunRecord:
    """Written beside PATH.part when the part is created, with the model and variant of the first answer
    added once it comes; removed when the part becomes PATH (or is removed)."""

    def __init__(self, part: Path, params: dict[str, Any]) -> None:
        self.path = part.with_name(part.name + ".json")
        self.part = part
        self.params = dict(params)
        self.model: Model | None = None

    def check_resume(self) -> None:
        """Before PATH.part is opened for --resume: refuse a part another run (or an unknown one) left."""
        if not self.part.exists():
            return
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{self.part} has no record of the run that wrote it ({self.path} is missing), so "
                             "it cannot be known to be this run's: remove it to start over") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.path} cannot be read ({exc}): remove it and {self.part} to start over") from None
        if not isinstance(saved, dict):
            raise InputError(f"{self.path} is not a run record: remove it and {self.part} to start over")
        for key, value in self.params.items():
            if key == "long_text_mode" and saved.get(key) == "error":
                continue  # its rows are of texts that fit the limit: the same in every mode (error, then truncate)
            if saved.get(key) != value:
                raise InputError(f"{self.part} was written with {key}={saved.get(key)!r} where this run has "
                                 f"{key}={value!r}: not this run's output; remove it to start over")
        if all(isinstance(saved.get(k), str) for k in _MODEL_KEYS[:2]):  # records of older clients lack digests
            weights, model = (d if isinstance(d := saved.get(k), str) else "" for k in _MODEL_KEYS[2:])
            self.model = (saved["model_id"], saved["variant"], weights, model)

    def created(self) -> None:
        """PATH.part was created (not resumed): record this run's parameters."""
        self._write()

    def answered(self, model: Model) -> None:
        """An answer of this run: it must come from the part's model; the first is recorded before any row (and
        the first digest, where the record has none)."""
        if self.model is not None and not same_model(model, self.model):
            raise OtherModel(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{self.part} was computed by model {describe_model(self.model)} but the server now "
                             f"serves {describe_model(model)}; the vectors would not be comparable: remove it to "
                             "start over")
        if (held := held_to(self.model, model)) != self.model:
            self.model = held
            self._write()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        record: dict[str, Any] = {**self.params, **dict.fromkeys(_MODEL_KEYS)}
        if self.model is not None:
            record.update(zip(_MODEL_KEYS, self.model, strict=True))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
