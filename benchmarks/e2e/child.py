"""The command line of the benchmark's child scripts (run_variant, trl_grpo, heldout, padding), each run in a
fresh process by `bench_e2e._child`:

    python benchmarks/e2e/SCRIPT.py SPEC.json RESULT.json

`spec_main(run, doc)` reads SPEC.json, calls `run(spec)` and writes what it returns as RESULT.json.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path


def spec_main(run: Callable[[dict], dict], doc: str | None, argv: list[str] | None = None) -> int:
    """Exit status of `SCRIPT SPEC.json RESULT.json`: 2 (and `doc` on stderr) for other arguments."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(doc, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run(spec)))
    return 0
