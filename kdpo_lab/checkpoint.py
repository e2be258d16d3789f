"""Run folders on disk: checkpoints a kill cannot tear, the format version, the kernel as safetensors.

A run folder (format 2) holds

    kdpo_run.json               {"format": 2}: which layout wrote the folder
    config.yaml                 the configuration it ran with
    checkpoint-000150/          one complete checkpoint per folder; the last two are kept
        (accelerate's save_state files: model, optimiser, RNG states, registered objects)
        kernel.safetensors, kernel.json   the kernel (DPO runs with a kernel)
        state.json              {"step": 150}, written last
    model/, kernel.safetensors, kernel.json, metrics.jsonl, eval.jsonl

A checkpoint is written into `checkpoint-000150.tmp/`, its files are flushed to disk, and only then
is the folder renamed to `checkpoint-000150/` (a rename is atomic on POSIX file systems). A kill at
any moment leaves either the complete folder or a `.tmp` one, which resume ignores and the next save
removes. Format 1 (before this module) overwrote one `checkpoint/` folder in place, so a kill during
a save could leave new weights under the old step: such folders are refused on resume, with a message.
"""
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdpo_lab import kernels

FORMAT = 2
RUN_FILE = "kdpo_run.json"
KEEP = 2
_NAME = re.compile(r"^checkpoint-(\d{6,})$")


def folder_name(step):
    return f"checkpoint-{step:06d}"


# ----------------------------------------------------------------------------- the run folder

def check_folder(out, resume):
    """Refuse a folder this version cannot continue (read only: every process calls it).

    resume=True on a format-1 folder (one checkpoint/ overwritten in place) raises ValueError: its
    checkpoint may be torn and nothing records whether it is. A format newer than FORMAT raises too."""
    found = read_format(out)
    if resume and found == 1:
        raise ValueError(f"{out}: written by kdpo_lab before run-folder format {FORMAT} (one checkpoint/ "
                         f"overwritten in place, which a kill could tear), so it cannot be resumed; start it "
                         f"again with resume=false (CHANGELOG.md)")
    if found is not None and found > FORMAT:
        raise ValueError(f"{out}: run-folder format {found} is newer than this kdpo_lab's ({FORMAT}); upgrade kdpo_lab")


def prepare_folder(out, resume):
    """Create the folder and mark its format (main process only). A fresh run (resume=False) removes the
    checkpoints of an earlier run in the same folder: a resume after a kill would pick their newer step."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for path in [out / "checkpoint", *checkpoints(out), *out.glob("checkpoint-*.tmp")]:
            shutil.rmtree(path, ignore_errors=True)
    _write_json(out / RUN_FILE, {"format": FORMAT})


def read_format(out):
    """The run-folder format of `out`: FORMAT or another number from kdpo_run.json, 1 for an old folder
    with a single checkpoint/ and no kdpo_run.json, None for a folder that holds no run."""
    path = Path(out) / RUN_FILE
    if path.exists():
        return json.loads(path.read_text())["format"]
    return 1 if (Path(out) / "checkpoint").is_dir() else None


def checkpoints(out):
    """Complete checkpoint folders of a run, oldest first (a folder counts once renamed from .tmp)."""
    found = [(int(m.group(1)), p) for p in Path(out).glob("checkpoint-*")
             if (m := _NAME.match(p.name)) and (p / "state.json").exists()]
    return [p for _, p in sorted(found)]


def latest(out):
    """The newest complete checkpoint folder, or None."""
    found = checkpoints(out)
    return found[-1] if found else None


def step_of(folder):
    return json.loads((Path(folder) / "state.json").read_text())["step"]


# ----------------------------------------------------------------------------- one checkpoint

def temp_folder(out, step):
    """The folder the save of `step` writes into, before publish() renames it."""
    return Path(out) / (folder_name(step) + ".tmp")


def empty_temp_folder(out, step):
    """Create temp_folder(out, step) empty (a leftover of a killed save is removed first)."""
    tmp = temp_folder(out, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp, step):
    """Make a written checkpoint visible: state.json last, flush every file, then rename atomically.
    Keeps the newest KEEP checkpoints and removes leftover .tmp folders. Returns the final folder."""
    tmp = Path(tmp)
    _write_json(tmp / "state.json", {"step": step})
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync(path)
    final = tmp.with_name(folder_name(step))
    if final.exists():  # the same step saved again (after a resume): the state is the same
        shutil.rmtree(tmp)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)
    for old in checkpoints(final.parent)[:-KEEP]:
        shutil.rmtree(old)
    for leftover in final.parent.glob("checkpoint-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def _write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj))
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path):
    try:
        _fsync(path)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass


# ----------------------------------------------------------------------------- the logs

LOGS = ("metrics.jsonl", "eval.jsonl")


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def clear_logs(out):
    """A fresh run: logs of an earlier run in the same folder would mix with this one's."""
    for name in LOGS:
        (Path(out) / name).unlink(missing_ok=True)


def truncate_logs(out, step):
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    for name in LOGS:
        path = Path(out) / name
        if path.exists():
            rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(r + "\n" for r in rows))


# ----------------------------------------------------------------------------- the kernel

def save_kernel(kernel, folder, params=None):
    """Write `kernel` as folder/kernel.safetensors (its tensors) and folder/kernel.json: its name, the
    parameters it was built with (kernels.get(name, **params)) and which tensors are learnable."""
    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in kernel.state_dict().items()}
    save_file(state, str(folder / "kernel.safetensors"))
    meta = {"format": 1, "name": kernel.name, "params": params or {},
            "parameters": [n for n, _ in kernel.named_parameters()]}
    (folder / "kernel.json").write_text(json.dumps(meta, indent=1))


def load_kernel(folder):
    """The kernel saved by save_kernel in `folder`, in one call: kernels.get(name, **params) with every
    saved tensor restored (fitted buffers such as a spectral basis included)."""
    folder = Path(folder)
    if not (folder / "kernel.json").exists():
        raise ValueError(f"{folder}: no kernel.json (a kernel is saved as kernel.safetensors + kernel.json)")
    meta = json.loads((folder / "kernel.json").read_text())
    kernel = kernels.get(meta["name"], **meta["params"])
    learnable = set(meta["parameters"])
    for key, value in load_file(str(folder / "kernel.safetensors")).items():
        *path, name = key.split(".")
        module = kernel.get_submodule(".".join(path))
        current = getattr(module, name, None)
        if isinstance(current, torch.Tensor) and current.shape == value.shape:
            with torch.no_grad():
                current.copy_(value)
        elif key in learnable:
            module._parameters.pop(name, None)
            module._buffers.pop(name, None)
            setattr(module, name, torch.nn.Parameter(value))
        else:
            module._parameters.pop(name, None)
            module.register_buffer(name, value)
    return kernel
