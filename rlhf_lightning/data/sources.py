"""Read records from local files, directories or anything ``datasets.load_dataset`` accepts.

Every record keeps where it came from: ``source_file`` (the file, or the hub dataset name) and ``source_line``
(1-based: the line in a ``.jsonl`` file, the record number in a ``.json``/``.parquet``/``.csv`` file or a hub
split). These columns travel through filtering, the validation hold-out, mixing and shuffling, so a message about
a bad row names the file and line a user can open (:func:`where`).

Every loader error names the source and the option it came from, so a typo in a YAML file or a broken file is one
:class:`~rlhf_lightning.errors.DataError` line instead of a stack trace from deep inside ``datasets``/pyarrow:
malformed JSON, a file of blank lines and bytes that are not UTF-8 are located (file and line) by re-reading the
file here when ``datasets`` fails.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path

import datasets

from rlhf_lightning.errors import DataError, MissingPathError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ORIGIN_COLUMNS = ("source_file", "source_line")


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).suffix in FILE_BUILDERS


def where(source_file: str, source_line: int) -> str:
    """``"data.jsonl line 7"`` for JSON-lines files, ``"data.csv record 7"`` for other formats and hub splits."""
    unit = "line" if source_file.endswith(".jsonl") else "record"
    return f"{source_file} {unit} {source_line}"


def jsonl_record_lines(path: Path) -> list[int]:
    """1-based line numbers of the non-blank lines of a JSON-lines file: ``datasets`` skips blank lines, so record
    ``i`` sits on line ``jsonl_record_lines(path)[i]``."""
    with path.open("rb") as handle:
        return [number for number, line in enumerate(handle, start=1) if line.strip()]


def _json_kind(value: object) -> str | None:
    """The JSON type of a cell as pyarrow sees it (numbers are one type; ``null`` fits any)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "text", list: "a list", dict: "an object"}[type(value)]


def _jsonl_problems(path: Path) -> Iterator[str]:
    """Why each bad line of a JSON-lines file cannot be read (first problems first): bytes that are not UTF-8,
    invalid JSON, a record that is not an object, a column whose type changes between lines."""
    any_record, kinds = False, {}
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            any_record = True
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield f"line {number}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1})"
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                yield f"line {number}: not valid JSON ({err.msg} at column {err.colno})"
                continue
            if not isinstance(value, dict):
                yield f"line {number}: a record must be a JSON object, got {type(value).__name__}"
                continue
            for key, cell in value.items():
                kind = _json_kind(cell)
                first = kinds.setdefault(key, (kind, number))
                if kind is not None and first[0] is None:
                    kinds[key] = first = (kind, number)
                if kind is not None and kind != first[0]:
                    yield (f"line {number}: '{key}' is {kind}, but on line {first[1]} it is {first[0]}; a column "
                           f"must have one type")
    if not any_record:
        yield "it has only blank lines, so no records"


def _json_problem(path: Path) -> str | None:
    """Why a whole-document ``.json`` file cannot be read, with its line, or ``None`` when it parses."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        return f"line {line}: not UTF-8 text (byte {raw[err.start]:#04x})"
    if not text.strip():
        return "it has only blank lines, so no records"
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return f"line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
    return None


def first_non_utf8_line(path: Path, chunk_size: int = 1 << 20) -> str | None:
    """``"line N: not UTF-8 text ..."`` for the first line of a text file that is not UTF-8, else ``None`` (one
    streaming pass)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line += chunk[:err.start].count(b"\n")
                return f"line {line}: not UTF-8 text (byte {chunk[err.start]:#04x})"
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"line {line}: not UTF-8 text (the file ends inside a character)"
    return None


def explain_unreadable(path: Path) -> str | None:
    """Locate what makes ``path`` unreadable (first bad line) for the JSON formats; ``None`` if nothing is found."""
    if path.suffix == ".jsonl":
        return next(_jsonl_problems(path), None)
    if path.suffix == ".json":
        return _json_problem(path)
    return None


def _load_file(path: Path, option: str, source: str) -> datasets.Dataset:
    builder = FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{option}='{source}': unsupported file type '{path.suffix}'; use one of "
                        f"{sorted(FILE_BUILDERS)}.")
    if path.stat().st_size == 0:
        raise DataError(f"{option}='{source}' is an empty file: it has no records.")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # pyarrow / datasets raise many types for one broken file
        problem = explain_unreadable(path) or f"{type(err).__name__}: {err}".splitlines()[0]
        raise DataError(f"{option}='{source}' cannot be read: {problem}. Fix the file.") from err
    problem = first_non_utf8_line(path) if builder != "parquet" else None
    if problem:  # pyarrow reads such bytes without complaint and fails later, deep inside training
        raise DataError(f"{option}='{source}' cannot be read: {problem}. Save the file as UTF-8.")
    lines = jsonl_record_lines(path) if path.suffix == ".jsonl" else range(1, len(dataset) + 1)
    if len(lines) != len(dataset):  # e.g. one line holding two objects: fall back to record numbers
        lines = range(1, len(dataset) + 1)
    return _with_origin(dataset, str(source), list(lines))


def _with_origin(dataset: datasets.Dataset, source_file: str, lines: list[int]) -> datasets.Dataset:
    for column in ORIGIN_COLUMNS:
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
    dataset = dataset.add_column("source_file", [source_file] * len(dataset))
    return dataset.add_column("source_line", lines)


def load_records(source: str, split: str = "train", option: str = "data.path") -> datasets.Dataset:
    """Load ``source`` as one :class:`datasets.Dataset` with ``source_file``/``source_line`` columns.

    ``source`` is a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a directory of such files (or one written
    by ``Dataset.save_to_disk``), or a hub dataset name (``split`` selects the split). Raises
    :class:`DataError`/:class:`MissingPathError` naming ``option`` for missing paths, unreadable or unsupported
    files and empty datasets.
    """
    path = Path(source).expanduser()
    if path.is_file():
        dataset = _load_file(path, option, source)
    elif path.is_dir():
        dataset = _load_directory(path, split, option)
    elif _looks_local(source):
        raise MissingPathError(f"{option}='{source}' does not exist. Point it at a data file, a directory or a "
                               f"hub dataset name.")
    else:
        try:
            dataset = datasets.load_dataset(source, split=split)
        except Exception as err:  # datasets raises many types for a bad name / no network
            raise DataError(f"{option}='{source}' is not a local path and could not be loaded as a hub dataset "
                            f"(split '{split}'): {type(err).__name__}: {err}") from err
        dataset = _with_origin(dataset, f"{source}[{split}]", list(range(1, len(dataset) + 1)))
    if len(dataset) == 0:
        raise DataError(f"{option}='{source}' has no records.")
    return dataset


def _load_directory(path: Path, split: str, option: str) -> datasets.Dataset:
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{option}='{path}' has splits {list(loaded)}, not '{split}'.")
            loaded = loaded[split]
        return _with_origin(loaded, str(path), list(range(1, len(loaded) + 1)))
    files = sorted(p for p in path.rglob("*") if p.suffix in FILE_BUILDERS and p.stat().st_size > 0)
    builders = {FILE_BUILDERS[p.suffix] for p in files}
    if not files:
        raise DataError(f"{option}='{path}' is a directory without non-empty {sorted(FILE_BUILDERS)} files.")
    if len(builders) > 1:
        raise DataError(f"{option}='{path}' mixes file types {sorted(builders)}; keep one type per directory.")
    return datasets.concatenate_datasets([_load_file(p, option, str(p)) for p in files])


def require_columns(dataset: datasets.Dataset, keys: dict[str, str], source: str) -> None:
    """Raise one error naming every missing ``option -> column`` pair and the columns that do exist."""
    missing = [f"{option}='{key}'" for option, key in keys.items() if key not in dataset.column_names]
    if missing:
        available = [c for c in dataset.column_names if c not in ORIGIN_COLUMNS]
        raise DataError(f"{source}: column(s) not found for {', '.join(missing)}. Available columns: "
                        f"{available}. Set the option to one of them.")
