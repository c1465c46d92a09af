"""Controls for the checkpoint-safety tests: unpickle a ``torch.save`` archive with plain ``pickle``.

``torch.load`` is only ever called with ``weights_only=True`` in this project. To show that a hostile
file's payload is live (so that refusing it is what keeps its code from running), the controls run
the archive's pickle stream through an unrestricted ``pickle.Unpickler`` instead, the mechanism an
unrestricted load would use. The payloads here hold no tensors, so no storage is ever resolved.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any


def unrestricted_unpickle(path: Path) -> Any:
    """The object of a ``torch.save`` archive without tensors, unpickled with no restriction."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        data = archive.read(name)

    class _Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            raise pickle.UnpicklingError(f"unexpected tensor storage {pid!r} in a control payload")

    return _Unpickler(io.BytesIO(data)).load()
