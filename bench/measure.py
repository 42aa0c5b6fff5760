"""Run one shell command and write its own rusage (peak RSS, CPU seconds) as JSON.

A tiny launcher process between the benchmark and each stage: Linux charges a child with
the memory high-water mark of the process it was forked from (`ru_maxrss` survives
fork/vfork + exec), so a stage spawned directly by the big benchmark process would report
the benchmark's own RSS. Forked from this small process, it reports its own.
Usage: python bench/measure.py OUT.json -- COMMAND...
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    out, separator, *command = argv
    if separator != "--" or not command:
        print(__doc__, file=sys.stderr)
        return 2
    proc = subprocess.Popen(command[0] if len(command) == 1 else command, shell=len(command) == 1)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    with open(out, "w") as handle:
        json.dump(
            {
                "returncode": code,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
            },
            handle,
        )
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
