"""Where ``nllloss eval`` writes: checked before anything is read, replaced only when complete.

Every output is written to a temporary file in its destination's folder and renamed onto the
destination once complete (``os.replace`` is atomic on one file system), so an interrupted or
failed run leaves the old file as it was. An output that is one of the inputs (the same file
under any name: hard link, symlink, or inside an input's Zarr directory) is refused before
anything is written.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from ._io import UserError, require_regular_file, split_spec


def check_outputs(outputs: dict[str, str], inputs: dict[str, str]) -> None:
    """Refuse outputs (option -> path) that are an input (label -> spec), each other, a file
    that is not regular, or in a missing folder."""
    seen: dict[str, str] = {}
    for option, path in outputs.items():
        destination = Path(path)
        label = f"{option} {path}"
        if not destination.resolve().parent.is_dir():
            raise UserError(f"{label}: its folder does not exist")
        if destination.exists():
            require_regular_file(destination, label)
        for input_label, spec in inputs.items():
            if _same_data(destination, split_spec(spec)[0]):
                raise UserError(f"{label}: is the input {input_label} {spec}; write elsewhere")
        key = str(destination.resolve())
        if key in seen:
            raise UserError(f"{label}: {seen[key]} names the same file")
        seen[key] = option


def _same_data(output: Path, source: Path) -> bool:
    if not (output.exists() and source.exists()):
        return False  # an output that does not exist yet is no input
    if source.is_dir():  # a Zarr store: any file inside it is its data
        return output.resolve().is_relative_to(source.resolve())
    return os.path.samefile(output, source)


def _file_mode() -> int:
    """The mode a new file gets from open(): 0o666 less the umask (mkstemp's is 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class Pending:
    """A temporary file beside ``path`` (``temp``), renamed onto ``path`` by ``commit``."""

    def __init__(self, path: str) -> None:
        destination = Path(path).resolve()  # through a symlink: the file it names is replaced
        self.path = str(destination)
        # the destination's suffix last: np.save and savefig go by it
        handle, self.temp = tempfile.mkstemp(
            dir=destination.parent,
            prefix=f".{destination.name}.",
            suffix=f".partial{destination.suffix}",
        )
        os.close(handle)
        mode = _file_mode()
        if destination.exists():  # keep a replaced file's permissions
            mode = stat.S_IMODE(destination.stat().st_mode)
        os.chmod(self.temp, mode)

    def commit(self) -> None:
        os.replace(self.temp, self.path)

    def discard(self) -> None:
        if os.path.exists(self.temp):
            os.unlink(self.temp)


def write_replacing(path: str, write) -> None:
    """``write(temp_path)``, then the result renamed onto ``path``; nothing left on failure."""
    pending = Pending(path)
    try:
        write(pending.temp)
        pending.commit()
    finally:
        pending.discard()
