"""Read the raw records of a data source: plain text, JSONL, ``datasets`` on local files, built-in domains.

A text record is one document (a string); a chat record is one conversation, a list of
``{"role", "content"}`` messages. :func:`read_source` returns ``(kind, train_records, valid_records)``;
``valid_records`` is None when the validation slice is to be cut from the packed blocks.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Any

from ..errors import MoeforgeError
from .builtin import builtin_documents

logger = logging.getLogger(__name__)

TEXT_EXTS = (".txt", ".md", ".text", ".py", ".rst")
JSONL_EXTS = (".jsonl", ".json", ".ndjson")
DATASETS_EXTS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}

#: ShareGPT speaker names -> chat roles
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
}
CHAT_ROLES = ("system", "user", "assistant")


def resolve_files(source_name: str, path: str) -> list[Path]:
    """The files behind ``path`` (a file, a directory or a glob), sorted; missing or empty raises."""
    p = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise MoeforgeError(f"data source {source_name!r}: the pattern {path!r} matches no files; check the path.")
        return files
    if not p.exists():
        raise MoeforgeError(f"data source {source_name!r}: {p} does not exist; check the path in the config.")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise MoeforgeError(f"data source {source_name!r}: directory {p} holds no files.")
        return files
    return [p]


def file_format(source, files: list[Path]) -> str:
    if source.format != "auto":
        return source.format
    exts = {f.suffix.lower() for f in files}
    if exts <= set(JSONL_EXTS):
        return "jsonl"
    if exts <= set(DATASETS_EXTS):
        return "datasets"
    if exts & (set(JSONL_EXTS) | set(DATASETS_EXTS)):
        raise MoeforgeError(
            f"data source {source.name!r} mixes file types ({', '.join(sorted(exts))}); "
            "point it at files of one format or set `format:`."
        )
    return "text"


def _read_text(files: list[Path]) -> list[str]:
    docs = []
    for f in files:
        try:
            docs.append(f.read_text(encoding="utf-8-sig"))  # a byte-order mark is not text
        except UnicodeDecodeError:
            raise MoeforgeError(f"{f} is not UTF-8 text; convert it or remove it from the data source.") from None
    return docs


def _json_document(f: Path) -> list[dict[str, Any]] | None:
    """The records of a ``.json`` file holding one JSON document (an object or a list of objects),
    or None when it is not one (then it is read as JSON Lines)."""
    try:
        data = json.loads(f.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return data
    return None


def _read_jsonl(files: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of JSONL files (or ``.json`` files holding a list of records) and each record's ``file:line``."""
    records, where = [], []
    for f in files:
        if f.suffix.lower() == ".json" and (document := _json_document(f)) is not None:
            records.extend(document)
            where.extend(f"{f} record {i}" for i in range(1, len(document) + 1))
            continue
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
                except UnicodeDecodeError:
                    raise MoeforgeError(
                        f"{f}:{lineno} is not UTF-8 text; convert the file to UTF-8 or remove it from the data source."
                    ) from None
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise MoeforgeError(f"{f}:{lineno} is not valid JSON ({err.msg}); every line must be one JSON object.") from None
                if not isinstance(rec, dict):
                    raise MoeforgeError(f"{f}:{lineno} is a JSON {type(rec).__name__}, expected an object.")
                records.append(rec)
                where.append(f"{f}:{lineno}")
    return records, where


def _read_datasets(source, files: list[Path]) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise MoeforgeError(
            f"data source {source.name!r} uses the `datasets` library, which is not installed; "
            "install it with `pip install 'moeforge[data]'` (or `pip install datasets`)."
        ) from None
    exts = {f.suffix.lower() for f in files}
    builders = {DATASETS_EXTS.get(e, "json" if e in JSONL_EXTS else "text") for e in exts}
    if len(builders) != 1:
        raise MoeforgeError(f"data source {source.name!r}: the datasets format needs files of one type, got {sorted(exts)}.")
    builder = builders.pop()
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as err:  # noqa: BLE001  (pandas/pyarrow/codec errors, often wrapped in DatasetGenerationError)
        cause = err.__cause__ if type(err).__name__ == "DatasetGenerationError" and err.__cause__ is not None else err
        raise MoeforgeError(
            f"data source {source.name!r}: the datasets library cannot read {', '.join(str(f) for f in files)} as "
            f"{builder} ({type(cause).__name__}: {' '.join(str(cause).split())}); fix or convert the file "
            "(UTF-8 text for csv/json) or set `format:`."
        ) from None
    return [dict(r) for r in ds]


def _detect_kind(source, first: Any) -> str:
    if source.kind != "auto":
        return source.kind
    if source.prompt_field is not None:
        return "chat"
    if isinstance(first, str):
        return "text"
    if "messages" in first or "conversations" in first:
        return "chat"
    if source.text_field in first:
        return "text"
    raise MoeforgeError(
        f"data source {source.name!r}: records have fields {sorted(first)} but no text_field {source.text_field!r}; "
        f"set text_field to the field holding the text, prompt_field/response_field (single-turn chat), or use "
        "`messages` / `conversations` (multi-turn chat)."
    )


def normalize_messages(source, record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """One chat record -> ``[{"role", "content"}, ...]`` with roles system/user/assistant."""
    if source.prompt_field is not None:
        for f in (source.prompt_field, source.response_field):
            if f not in record:
                raise MoeforgeError(f"{where}: record has no field {f!r} (fields: {sorted(record)}).")
        messages = [
            {"role": "user", "content": _content(record[source.prompt_field], where)},
            {"role": "assistant", "content": _content(record[source.response_field], where)},
        ]
    elif "messages" in record:
        if not isinstance(record["messages"], list):
            raise MoeforgeError(
                f"{where}: `messages` must be a list of {{role, content}} objects, got {record['messages']!r:.80}."
            )
        messages = []
        for m in record["messages"]:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise MoeforgeError(f"{where}: every message needs `role` and `content`, got {m!r}.")
            messages.append({"role": str(m["role"]), "content": _content(m["content"], where)})
    elif "conversations" in record:
        if not isinstance(record["conversations"], list):
            raise MoeforgeError(
                f"{where}: `conversations` must be a list of {{from, value}} objects, got {record['conversations']!r:.80}."
            )
        messages = []
        for m in record["conversations"]:
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise MoeforgeError(f"{where}: ShareGPT turns need `from` and `value`, got {m!r}.")
            role = SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise MoeforgeError(
                    f"{where}: unknown ShareGPT speaker {m['from']!r}; known: {', '.join(sorted(SHAREGPT_ROLES))}."
                )
            messages.append({"role": role, "content": _content(m["value"], where)})
    else:
        raise MoeforgeError(f"{where}: chat record needs `messages`, `conversations` or the prompt/response fields.")
    for m in messages:
        if m["role"] not in CHAT_ROLES:
            raise MoeforgeError(f"{where}: unknown role {m['role']!r}; roles are {', '.join(CHAT_ROLES)}.")
    if source.system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": source.system_prompt}] + messages
    if not any(m["role"] == "assistant" for m in messages):
        raise MoeforgeError(f"{where}: conversation has no assistant message, so nothing to learn from.")
    if messages[0]["role"] == "assistant":
        raise MoeforgeError(f"{where}: conversation starts with an assistant message; start it with a user (or system) turn.")
    return messages


def _content(value: Any, where: str) -> str:
    """A message's text: strings (and numbers) as they are; null or structured content is refused, not trained as
    its Python spelling ("None", "[{...}]")."""
    if value is None or isinstance(value, (dict, list)):
        raise MoeforgeError(
            f"{where}: a message's content is {'null' if value is None else 'a JSON ' + ('object' if isinstance(value, dict) else 'list')}, "
            "expected text; fix or drop the record."
        )
    return str(value)


def _records(source, path: str) -> tuple[str, list]:
    files = resolve_files(source.name, path)
    fmt = file_format(source, files)
    where_each: list[str] = []
    if fmt == "text":
        raw: list = _read_text(files)
        raw = [d for d in raw if d.strip()]
    elif fmt == "jsonl":
        raw, where_each = _read_jsonl(files)
    else:
        raw = _read_datasets(source, files)
        where_each = [f"{path} record {i}" for i in range(1, len(raw) + 1)]
    if not raw:
        raise MoeforgeError(
            f"data source {source.name!r}: {path} is empty (no documents or records); add data or remove the source."
        )
    kind = _detect_kind(source, raw[0])
    where = f"data source {source.name!r}"
    if kind == "chat":
        if fmt == "text":
            raise MoeforgeError(f"{where} ({path}): chat data must be JSONL records, not plain text files.")
        out: list = [normalize_messages(source, r, f"{where}, {loc}") for r, loc in zip(raw, where_each)]
    elif fmt == "text":
        out = raw
    else:
        out, blank = [], []
        for r, loc in zip(raw, where_each):
            if source.text_field not in r:
                raise MoeforgeError(
                    f"{where}, {loc}: record has no field {source.text_field!r} (fields: {sorted(r)}); set text_field."
                )
            text = r[source.text_field]
            if text is not None and not isinstance(text, str):
                raise MoeforgeError(
                    f"{where}, {loc}: field {source.text_field!r} is a {type(text).__name__}, not a string; "
                    "fix the record or point text_field at the text."
                )
            if text is None or not text.strip():
                blank.append(loc)
            else:
                out.append(text)
        if not out:
            raise MoeforgeError(f"{where} ({path}): every {source.text_field!r} field is empty.")
        if blank:
            logger.warning(
                "moeforge: data source %r: skipped %d record(s) whose %r field is empty or null (first: %s).",
                source.name, len(blank), source.text_field, blank[0],
            )
    return kind, out


def read_source(source) -> tuple[str, list, list | None]:
    """``(kind, train_records, valid_records or None)`` of one :class:`~moeforge.train.config.DataSource`."""
    if source.builtin is not None:
        kind = "text" if source.kind == "auto" else source.kind
        if kind != "text":
            raise MoeforgeError(f"data source {source.name!r}: built-in domains are plain text; remove `kind: {kind}`.")
        train = builtin_documents(source.builtin, "train")
        valid = builtin_documents(source.builtin, "valid") if source.valid_fraction > 0 or source.valid_path else None
        if source.valid_path:
            vkind, valid = _records(source, source.valid_path)
            if vkind != kind:
                raise MoeforgeError(
                    f"data source {source.name!r}: valid_path holds {vkind} data but built-in domains are text."
                )
        return kind, train, valid
    kind, train = _records(source, source.path)
    valid = None
    if source.valid_path:
        vkind, valid = _records(source, source.valid_path)
        if vkind != kind:
            raise MoeforgeError(f"data source {source.name!r}: valid_path holds {vkind} data but path holds {kind} data.")
    return kind, train, valid


def source_fingerprint(source) -> list:
    """What identifies a source's content: each file's path, size and SHA-256 (far cheaper than
    tokenising it again), or the built-in's name with the Python (its text comes from the standard
    library) and moeforge versions."""
    import hashlib
    import sys

    from .. import __version__

    def digest(f: Path) -> str:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def files_id(path: str) -> list:
        return [[str(f.resolve()), f.stat().st_size, digest(f)] for f in resolve_files(source.name, path)]

    out: list = []
    if source.builtin is not None:
        out.append(["builtin", source.builtin, list(sys.version_info[:3]), __version__])
    else:
        out.append(files_id(source.path))
    if source.valid_path:
        out.append(files_id(source.valid_path))
    return out
