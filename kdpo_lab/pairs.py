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
    """What loading and encoding did: rows read and kept, problems, truncations, token lengths.

    lengths: tokens of prompt + response for every encoded sequence (chosen and rejected), before
    any cutting; n_skipped_after_cut: rows dropped because chosen and rejected became identical."""
    source: str = ""
    n_read: int = 0
    n_ok: int = 0
    problems: list = field(default_factory=list)
    n_prompt_truncated: int = 0
    n_response_truncated: int = 0
    n_skipped_after_cut: int = 0
    lengths: list = field(default_factory=list)
    n_used: int | None = None  # pairs encoded (set by loading.encode)

    def summary(self, max_problems=None):
        """The full account, one line per problem (for data_report.txt; `headline` is the short one)."""
        text = f"{self.source}: read {self.n_read} rows, kept {self.n_ok}, skipped {self.n_read - self.n_ok}"
        if self.n_prompt_truncated:
            text += f"; {self.n_prompt_truncated} prompts truncated to fit max_length"
        if self.n_response_truncated:
            text += f"; {self.n_response_truncated} responses truncated from the right"
        if self.n_skipped_after_cut:
            text += f"; {self.n_skipped_after_cut} rows skipped (chosen and rejected identical once cut)"
        shown = self.problems if max_problems is None else self.problems[:max_problems]
        lines = [text] + [f"  - {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more problems")
        return "\n".join(lines)

    def headline(self, max_length, share=0.95):
        """One line for the terminal: rows skipped and cut, length percentiles, and the max_length that
        would keep `share` of all tokens. Empty when nothing was skipped or cut."""
        n_bad = self.n_read - self.n_ok
        cut = self.n_prompt_truncated + self.n_response_truncated
        if not (n_bad or cut or self.n_skipped_after_cut):
            return ""
        parts = []
        if n_bad:
            first = self.problems[0]  # loading's problems come before encoding's
            parts.append(f"{n_bad} malformed rows skipped (first: {first})")
        if cut:
            parts.append(f"{self.n_prompt_truncated} prompts cut from the left and {self.n_response_truncated} pairs' "
                         f"responses from the right to fit max_length={max_length}")
        if self.n_skipped_after_cut:
            parts.append(f"{self.n_skipped_after_cut} skipped (identical once cut)")
        if self.lengths:
            ordered = sorted(self.lengths)
            pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
            parts.append(f"tokens per sequence p50 {pick(0.5)}, p90 {pick(0.9)}, max {ordered[-1]}; "
                         f"max_length {length_for_token_share(self.lengths, share)} keeps {share:.0%} of tokens")
        used = f"{self.n_used} pairs used" if self.n_used is not None else f"{self.n_ok} pairs"
        return f"{self.source}: {used}; " + "; ".join(parts)

    def add(self, problem, strict=False):
        """Record a row's problem; with strict, raise it as a DataError instead."""
        if strict:
            raise DataError(str(problem))
        self.problems.append(problem)


def length_for_token_share(lengths, share=0.95):
    """The smallest M such that cutting every sequence to M tokens keeps at least `share` of all tokens:
    sum_i min(n_i, M) >= share * sum_i n_i. (Not the 95th percentile of lengths: long sequences hold
    more tokens, so this M is larger whenever lengths vary.)"""
    if not lengths:
        raise ValueError("length_for_token_share needs at least one length")
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1]; got {share}")
    ordered = sorted(lengths)
    target, below = share * sum(ordered), 0  # below: tokens of the sequences shorter than the candidate M
    for k, n in enumerate(ordered):
        m = -(-(target - below) // (len(ordered) - k))  # ceil: smallest M with below + (N - k) * M >= target
        if m <= n:
            return max(int(m), 1)
        below += n
    return ordered[-1]
