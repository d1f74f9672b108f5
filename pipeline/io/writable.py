"""Whether an output location can be written, asked before any scene is read."""

from __future__ import annotations

import uuid

from pipeline.errors import OutputNotWritableError


def check_output_writable(output_root: str) -> None:
    """Create the folder, write and delete a probe; :class:`OutputNotWritableError` if not."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(output_root)
        probe = f"{root.rstrip('/')}/_write_probe_{uuid.uuid4().hex}"
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
    except (OSError, PermissionError, ValueError) as error:
        raise OutputNotWritableError(f"output {output_root} is not writable: {error}") from None
