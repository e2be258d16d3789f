"""Reading preference files in the common public formats, with validation reports.

Loading (`load_pairs`): files (.jsonl, .json, .csv, .parquet) or a directory, or a hub dataset
name for users with internet. Formats, detected from the first record's keys:
  text       prompt, chosen, rejected as strings (the suite's format; family and meta are kept)
  hh         chosen, rejected as whole "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts
             (HH-RLHF); the implicit prompt is everything before the last "\\n\\nAssistant:"
  messages   chosen / rejected as lists of {"role", "content"} messages (UltraFeedback-binarized,
             TRL conversational); the prompt is every message before the final assistant turn,
             or the `prompt` field (string or message list) when chosen holds only that turn
  sharegpt   `conversations`: a list of {"from", "value"} turns ending with the user's turn, plus
             chosen / rejected as {"from": "gpt", "value": ...} dicts or strings (LLaMA-Factory)
Numeric score_chosen / score_rejected fields (UltraFeedback-binarized) are kept in `pair.meta`.
Each bad row becomes a `Problem` naming file, row and field; strict=True raises `DataError` on
the first one, strict=False skips the row and records it in the `DataReport`.
"""
import csv
import json
import re
from pathlib import Path

from kdpo_lab.pairs import DataError, DataReport, PreferencePair, Problem

FORMATS = ("text", "hh", "messages", "sharegpt")
SCORE_FIELDS = ("score_chosen", "score_rejected")  # kept in pair.meta when a row has them (ODPO offsets)


class _Bad(Exception):
    """A row-level problem raised inside the parsers: (field, message)."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field, self.message = field, message



# ----------------------------------------------------------------------------------------------
# Reading files: each reader yields (row, record) where record is a dict or a _Bad


def _bad_text_path(obj, path=""):
    """The field path of the first string holding undecodable bytes (surrogate escapes), or None."""
    if isinstance(obj, str):
        return path if re.search("[\udc80-\udcff]", obj) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        sub = f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else k
        found = _bad_text_path(v, sub)
        if found is not None:
            return found
    return None


def _checked(record, bad_offset=None):
    """A parsed record, or a _Bad for non-objects and strings that held undecodable bytes."""
    if not isinstance(record, dict):
        return _Bad(None, f"expected an object with named fields, got {type(record).__name__}")
    where = _bad_text_path(record)
    if where is not None:
        at = f" at byte {bad_offset} of the line" if bad_offset is not None else ""
        return _Bad(where, f"undecodable bytes (not valid UTF-8){at}")
    return record


def _read_jsonl(path, split=None):
    with open(path, "rb") as f:
        for row, raw in enumerate(f, 1):
            if row == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                line, offset = raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                line, offset = raw.decode("utf-8", errors="surrogateescape"), e.start
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if offset is not None:
                    yield row, _Bad(None, f"undecodable bytes (not valid UTF-8) at byte {offset} of the line")
                else:
                    yield row, _Bad(None, f"malformed JSON: {e.msg} at column {e.colno}")
                continue
            yield row, _checked(record, offset)


def _read_json(path, split):
    text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if isinstance(data, dict):
        key = next((k for k in (split, "data", "rows", "train") if k and isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(f"{path}: expected a list of records (or an object holding one under "
                            f"'data', 'rows' or the split name); found keys {sorted(data)}")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, got {type(data).__name__}")
    for row, record in enumerate(data, 1):
        yield row, _checked(record)


def _read_csv(path, split=None):
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        for record in reader:
            record.pop(None, None)  # extra unnamed cells
            yield reader.line_num, _checked(record)


def _plain(value):
    """numpy / pandas values from parquet -> plain Python (arrays -> lists)."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_parquet(path, split=None):
    try:
        import pandas as pd
        frame = pd.read_parquet(path)
    except ImportError as e:
        raise DataError(f"{path}: reading parquet needs pandas with pyarrow ({e})") from None
    for row, record in enumerate(frame.to_dict("records"), 1):
        yield row, _checked(_plain(record))


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _files(source, split):
    """The data files of a file or directory source (sorted), for one split of a directory."""
    path = Path(source)
    if path.is_file():
        if path.suffix not in _READERS:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {sorted(_READERS)}")
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in _READERS and p.name != "world.json")
    if split is not None:
        files = [p for p in files if p.stem == split or re.match(rf"{re.escape(split)}[-_.]", p.stem)]
        if not files:
            raise DataError(f"{path}: no file for split {split!r} (looked for {split}.jsonl/.json/.csv/"
                            f".parquet or {split}-*)")
    elif len(files) != 1:
        raise DataError(f"{path}: {len(files)} data files found ({', '.join(p.name for p in files) or 'none'}); "
                        f"pass split= to choose one")
    return files


def _is_local(source):
    path = Path(source)
    return path.exists() or path.suffix in _READERS or path.is_absolute() or str(source).startswith(".") \
        or (len(path.parts) > 1 and Path(path.parts[0]).exists())


def _hub_records(name, split):
    import datasets  # only for hub names: the one place this module may use the network
    dataset = datasets.load_dataset(name, split=split or "train")
    for row, record in enumerate(dataset, 1):
        yield row, _checked(_plain(record))


# ----------------------------------------------------------------------------------------------
# Parsing records into pairs, one parser per format

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
          "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}


def _describe(value):
    shown = repr(value)
    return f"{type(value).__name__} ({shown[:40] + '...' if len(shown) > 40 else shown})"


def _text(record, key, label=None):
    """A non-empty string field, else _Bad naming the field."""
    label = label or key
    if key not in record:
        raise _Bad(label, "missing field")
    value = record[key]
    if not isinstance(value, str):
        raise _Bad(label, f"expected text, got {_describe(value)}")
    if not value.strip():
        raise _Bad(label, "empty string")
    return value


def _messages(value, label, role_key="role", content_key="content"):
    """Validate a message list -> [{"role", "content"}] with roles normalised (human -> user, ...)."""
    if not isinstance(value, list) or not value:
        raise _Bad(label, f"expected a non-empty list of messages, got {_describe(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _Bad(f"{label}[{i}]", f"expected a message object, got {_describe(m)}")
        role = m.get(role_key, m.get("role"))
        if role not in _ROLES:
            raise _Bad(f"{label}[{i}].{role_key}", f"unknown role {role!r}; expected one of {sorted(_ROLES)}")
        content = m.get(content_key, m.get("content"))
        if not isinstance(content, str):
            raise _Bad(f"{label}[{i}].{content_key}", f"expected text, got {_describe(content)}")
        out.append({"role": _ROLES[role], "content": content})
    return out


def plain_chat(messages, add_generation_prompt=True):
    """The fallback chat format without a tokenizer template: "Role:\\ncontent\\n" per message, then
    "Assistant:\\n". The newline before the response keeps tokenisation of prompt and response
    separately identical to tokenising them together (byte-level BPE never merges across it)."""
    text = "".join(f"{m['role'].capitalize()}:\n{m['content']}\n" for m in messages)
    return text + ("Assistant:\n" if add_generation_prompt else "")


def _prompt_text(messages):
    """`PreferencePair.prompt` of a conversation: the user's text for one turn, else plain_chat."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return plain_chat(messages, add_generation_prompt=False).rstrip("\n")


def _conversational_pair(prompt_messages, chosen, rejected):
    if not any(m["content"].strip() for m in prompt_messages):
        raise _Bad("prompt", "empty prompt (no message has text)")
    for label, response in (("chosen", chosen), ("rejected", rejected)):
        if not response.strip():
            raise _Bad(label, "empty response")
    return PreferencePair(_prompt_text(prompt_messages), chosen, rejected, prompt_messages=prompt_messages)


def _parse_text(record):
    return PreferencePair(_text(record, "prompt"), _text(record, "chosen"), _text(record, "rejected"))


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_messages(text, label):
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise _Bad(label, "not an HH-RLHF transcript: expected '\\n\\nHuman: ...\\n\\nAssistant: ...'")
    messages = [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
                for r, c in zip(parts[1::2], parts[2::2])]
    if messages[-1]["role"] != "assistant":
        raise _Bad(label, "transcript does not end with an '\\n\\nAssistant:' turn")
    return messages


def _parse_hh(record):
    chosen = _hh_messages(_text(record, "chosen"), "chosen")
    rejected = _hh_messages(_text(record, "rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise _Bad("rejected", "does not share the prompt of 'chosen' (the transcript before the last "
                               "'\\n\\nAssistant:')")
    return _conversational_pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def _response(record, key, role_key="role", content_key="content"):
    """(response text, messages before it or []) from a string, a message dict, or a message list."""
    if key not in record:
        raise _Bad(key, "missing field")
    value = record[key]
    if isinstance(value, str):
        return _text(record, key), []
    if isinstance(value, dict):
        value = [value]
    messages = _messages(value, key, role_key, content_key)
    if messages[-1]["role"] != "assistant":
        raise _Bad(f"{key}[{len(messages) - 1}]", f"last message must be the assistant's, got "
                                                  f"role {messages[-1]['role']!r}")
    return messages[-1]["content"], messages[:-1]


def _parse_messages(record):
    chosen, before_c = _response(record, "chosen")
    rejected, before_r = _response(record, "rejected")
    prompt = before_c
    if not prompt:
        if "prompt" not in record:
            raise _Bad("prompt", "missing field (needed when 'chosen' holds only the assistant turn)")
        value = record["prompt"]
        prompt = ([{"role": "user", "content": _text(record, "prompt")}] if not isinstance(value, list)
                  else _messages(value, "prompt"))
    if before_r and before_r != prompt:
        raise _Bad("rejected", "the conversation before the last turn differs from that of 'chosen'")
    return _conversational_pair(prompt, chosen, rejected)


def _parse_sharegpt(record):
    if "conversations" not in record:
        raise _Bad("conversations", "missing field")
    turns = _messages(record["conversations"], "conversations", "from", "value")
    if isinstance(record.get("system"), str) and record["system"].strip():
        turns = [{"role": "system", "content": record["system"]}] + turns
    if turns[-1]["role"] != "user":
        raise _Bad("conversations", f"last turn must be the user's ('human'), got {turns[-1]['role']!r}")
    chosen, _ = _response(record, "chosen", "from", "value")
    rejected, _ = _response(record, "rejected", "from", "value")
    return _conversational_pair(turns, chosen, rejected)


_PARSERS = {"text": _parse_text, "hh": _parse_hh, "messages": _parse_messages, "sharegpt": _parse_sharegpt}
_FORMAT_HELP = ("accepted formats: text (prompt, chosen, rejected as strings); hh (chosen, rejected as "
                "'\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts); messages (chosen, rejected as lists of "
                "{role, content}, optional prompt); sharegpt (conversations as a list of {from, value}, plus "
                "chosen, rejected)")


def detect_format(record):
    """The format name of one record from its keys and value types, or None."""
    if "conversations" in record:
        return "sharegpt"
    if "chosen" in record and "rejected" in record:
        if any(isinstance(record.get(k), list) for k in ("prompt", "chosen", "rejected")):
            return "messages"
        return "text" if "prompt" in record else "hh"
    return None


def _parse(record, fmt):
    pair = _PARSERS[fmt](record)
    if pair.chosen.strip() == pair.rejected.strip():
        raise _Bad("rejected", "identical to 'chosen'")
    family, meta = record.get("family", ""), record.get("meta", {})
    if not isinstance(family, str):
        raise _Bad("family", f"expected text, got {_describe(family)}")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise _Bad("meta", f"expected an object, got {_describe(meta)}")
    scores = {k: record[k] for k in SCORE_FIELDS if k in record}
    for k, v in scores.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad(k, f"expected a number, got {_describe(v)}")
    pair.family, pair.meta = family, {**meta, **scores}
    return pair


def load_pairs(source, split=None, fmt="auto", strict=False, limit=None):
    """Read preference pairs -> (pairs, report).

    source: a .jsonl / .json / .csv / .parquet file, a directory (with split: the files named
        split.* or split-*), or a hub dataset name (only then is `datasets.load_dataset` called).
    fmt: "auto" (detected per file from its first record) or one of FORMATS.
    strict: False -> a bad row is skipped and recorded in report.problems (print report.summary());
        True -> DataError on the first bad row. An unknown format, an unreadable file or a source
        with no valid row raise DataError either way.
    limit: stop after this many valid pairs.
    Rows: 1-based line numbers for .jsonl and .csv, 1-based record index otherwise.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"fmt must be 'auto' or one of {FORMATS}; got {fmt!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None; got {limit!r}")
    if _is_local(source):
        if not Path(source).exists():
            raise DataError(f"{source}: no such file or directory")
        sources = [(str(p), _READERS[p.suffix](p, split)) for p in _files(source, split)]
    else:
        sources = [(f"{source}[{split or 'train'}]", _hub_records(source, split))]
    report, pairs = DataReport(source=str(source)), []
    for name, records in sources:
        file_fmt = None if fmt == "auto" else fmt
        for row, record in records:
            report.n_read += 1
            try:
                if isinstance(record, _Bad):
                    raise record
                if file_fmt is None:
                    file_fmt = detect_format(record)
                    if file_fmt is None:
                        raise DataError(f"{name} row {row}: unknown format; found keys {sorted(record)}; "
                                        + _FORMAT_HELP)
                pair = _parse(record, file_fmt)
            except _Bad as bad:
                report.add(Problem(name, row, bad.field, bad.message), strict)
                continue
            pair.source = f"{name}:{row}"
            pairs.append(pair)
            report.n_ok += 1
            if limit is not None and len(pairs) >= limit:
                return pairs, report
    if not pairs:
        first = f"; first problem: {report.problems[0]}" if report.problems else ""
        raise DataError(f"{source}: no valid rows (read {report.n_read}){first}")
    return pairs, report
