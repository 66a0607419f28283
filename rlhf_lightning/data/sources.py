"""Read records from local files, directories or anything ``datasets.load_dataset`` accepts.

Every loader error names the source and the option it came from, so a typo in a YAML file is one clear
message instead of a stack trace from deep inside ``datasets``.
"""

from __future__ import annotations

from pathlib import Path

import datasets

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).suffix in FILE_BUILDERS


def load_records(source: str, split: str = "train", option: str = "data.path") -> datasets.Dataset:
    """Load ``source`` as one :class:`datasets.Dataset`.

    ``source`` is a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a directory of such files (or one written
    by ``Dataset.save_to_disk``), or a hub dataset name (``split`` selects the split). Raises a clear error for
    missing paths, unsupported files and empty datasets.
    """
    path = Path(source).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"{option}='{source}': unsupported file type '{path.suffix}'; "
                             f"use one of {sorted(FILE_BUILDERS)}.")
        if path.stat().st_size == 0:
            raise ValueError(f"{option}='{source}' is an empty file: it has no records.")
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    elif path.is_dir():
        dataset = _load_directory(path, split, option)
    elif _looks_local(source):
        raise FileNotFoundError(f"{option}='{source}' does not exist. Point it at a data file, a directory or a "
                                f"hub dataset name.")
    else:
        try:
            dataset = datasets.load_dataset(source, split=split)
        except Exception as err:  # datasets raises many types for a bad name / no network
            raise ValueError(f"{option}='{source}' is not a local path and could not be loaded as a hub dataset "
                             f"(split '{split}'): {type(err).__name__}: {err}") from err
    if len(dataset) == 0:
        raise ValueError(f"{option}='{source}' has no records.")
    return dataset


def _load_directory(path: Path, split: str, option: str) -> datasets.Dataset:
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KeyError(f"{option}='{path}' has splits {list(loaded)}, not '{split}'.")
            loaded = loaded[split]
        return loaded
    files = sorted(p for p in path.rglob("*") if p.suffix in FILE_BUILDERS and p.stat().st_size > 0)
    builders = {FILE_BUILDERS[p.suffix] for p in files}
    if not files:
        raise ValueError(f"{option}='{path}' is a directory without non-empty {sorted(FILE_BUILDERS)} files.")
    if len(builders) > 1:
        raise ValueError(f"{option}='{path}' mixes file types {sorted(builders)}; keep one type per directory.")
    return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train")


def require_columns(dataset: datasets.Dataset, keys: dict[str, str], source: str) -> None:
    """Raise one error naming every missing ``option -> column`` pair and the columns that do exist."""
    missing = [f"{option}='{key}'" for option, key in keys.items() if key not in dataset.column_names]
    if missing:
        raise KeyError(f"{source}: column(s) not found for {', '.join(missing)}. Available columns: "
                       f"{dataset.column_names}. Set the option to one of them.")
