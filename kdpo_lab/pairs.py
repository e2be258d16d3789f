"""A preference pair (x, y_w, y_l), and the problems and reports that reading data produces."""
from dataclasses import dataclass, field

SPLITS = ("train", "validation", "test")


# ----------------------------------------------------------------------------------------------
# Pairs, problems, reports


@dataclass
class PreferencePair:
    """One preference pair. `prompt` is always text (for a conversation: its plain rendering);
    `prompt_messages` keeps a conversational prompt as [{"role", "content"}, ...] so that
    `render_prompt` can apply a chat template. `source` = "file:row" where the pair was read."""
    prompt: str
    chosen: str
    rejected: str
    family: str = ""
    meta: dict = field(default_factory=dict)
    source: str = ""
    prompt_messages: list | None = None

    def to_dict(self):
        """The suite's row format: prompt, chosen, rejected, family, meta."""
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
                "family": self.family, "meta": self.meta}


class DataError(ValueError):
    """Bad data; the message names file, row and field, e.g.
    "data/x.jsonl row 17, field 'chosen': empty string"."""


@dataclass
class Problem:
    file: str
    row: int | None  # 1-based line for .jsonl/.csv, 1-based record index otherwise
    field: str | None
    message: str

    def __str__(self):
        where = self.file + (f" row {self.row}" if self.row is not None else "")
        return f"{where}, field '{self.field}': {self.message}" if self.field else f"{where}: {self.message}"


@dataclass
class DataReport:
    """What loading and encoding did: rows read and kept, problems, truncations."""
    source: str = ""
    n_read: int = 0
    n_ok: int = 0
    problems: list = field(default_factory=list)
    n_prompt_truncated: int = 0
    n_response_truncated: int = 0

    def summary(self, max_problems=10):
        """A short human-readable account, e.g. for printing before a run starts."""
        text = f"{self.source}: read {self.n_read} rows, kept {self.n_ok}, skipped {self.n_read - self.n_ok}"
        if self.n_prompt_truncated:
            text += f"; {self.n_prompt_truncated} prompts truncated to fit max_length"
        if self.n_response_truncated:
            text += f"; {self.n_response_truncated} responses truncated from the right"
        lines = [text] + [f"  - {p}" for p in self.problems[:max_problems]]
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more problems")
        return "\n".join(lines)

    def add(self, problem, strict=False):
        """Record a row's problem; with strict, raise it as a DataError instead."""
        if strict:
            raise DataError(str(problem))
        self.problems.append(problem)
