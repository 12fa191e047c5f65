"""The one JSON of a GPU check (`run.sh`), rewritten after every step so that a run cut short keeps what it did.

    python benchmarks/gpu/summary.py LOGS SUMMARY.json DEVICE

LOGS (run.sh's working folder) holds `env.json` (machine and versions), `steps.tsv` (one line per step: name,
rc or `skipped`, seconds, time limit, command), `NAME.log` per step and `NAME.json` for a step that measures
something (kernels, trainer, engine). SUMMARY.json: the machine and versions, then each step with its rc,
seconds, limit, command, the last lines of its log and its figures (its `NAME.json`, whole).
Exit status: 0 when every step passed or was skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LOG_TAIL_CHARS = 3000


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # a step killed mid-write leaves no file or half a file
        return {"unreadable": f"{path.name}: {exc!r}"} if path.exists() else None


def summarize(logs: Path, device: str) -> dict:
    steps = []
    tsv = logs / "steps.tsv"
    for line in tsv.read_text().splitlines() if tsv.exists() else []:
        name, rc, secs, limit, cmd = line.split("\t", 4)
        log = logs / f"{name}.log"
        steps.append(dict(step=name, rc=rc if rc == "skipped" else int(rc), seconds=round(float(secs), 1),
                          limit_s=int(limit), timed_out=rc in ("124", "137"), cmd=cmd,
                          log_tail=log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log.exists() else "",
                          figures=read_json(logs / f"{name}.json")))
    ok = all(s["rc"] in (0, "skipped") for s in steps)
    return dict(check="gpu_check", device=device, ok=ok, env=read_json(logs / "env.json"),
                total_s=round(sum(s["seconds"] for s in steps), 1), total_limit_s=sum(s["limit_s"] for s in steps),
                failed=[s["step"] for s in steps if s["rc"] not in (0, "skipped")], steps=steps,
                note=None if device == "cuda" else "CPU dry run of the GPU script: no GPU figure")


def main(argv: list[str]) -> int:
    logs, out, device = Path(argv[0]), Path(argv[1]), argv[2]
    summary = summarize(logs, device)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out)  # whole or not at all, also when the run is killed while writing
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
