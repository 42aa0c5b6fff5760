"""`python bench/measure.py OUT.json -- COMMAND...`: run COMMAND, write its rusage as JSON.

A small launcher between the benchmark and each stage: `ru_maxrss` survives fork + exec, so a
stage forked straight from the big benchmark process would report the benchmark's RSS."""

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
