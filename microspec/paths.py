"""Where microspec looks for files it does not ship: the shared data folder and the user cache."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache: $MICROSPEC_CACHE, default ~/.cache/microspec."""
    return Path(os.environ.get("MICROSPEC_CACHE", Path.home() / ".cache" / "microspec"))


def shared_data_dir(required: bool = True) -> Path | None:
    """The shared data folder: $MICROSPEC_SHARED_DATA, else ../shared/data next to the current directory
    or next to the repository root. Raises FileNotFoundError when absent and `required`, else None.

    MICROSPEC_NO_SHARED=1 hides the folder (and the `../shared/models` beside it) wherever it is, even when
    MICROSPEC_SHARED_DATA is set: how a test sees what a user without this repository's data sees."""
    if os.environ.get("MICROSPEC_NO_SHARED", "") not in ("", "0"):
        if required:
            raise FileNotFoundError("shared data folder hidden by MICROSPEC_NO_SHARED")
        return None
    env = os.environ.get("MICROSPEC_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / "../shared/data", Path(__file__).resolve().parents[1] / "../shared/data"]
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    if required:
        raise FileNotFoundError(f"shared data folder not found (tried {', '.join(map(str, candidates))}); "
                                "set MICROSPEC_SHARED_DATA")
    return None
