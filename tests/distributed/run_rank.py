"""Per-rank entry point: run pytest on this rank with its output in ``OUTDIR/rank<N>.log``.

Usage (from tests/test_distributed.py): ``<launcher> python tests/distributed/run_rank.py OUTDIR
[pytest args]``. Separate logs keep the ranks' output apart, so a failure can be shown with the
failing rank's own output.
"""
from __future__ import annotations

import os
import sys


def _rank() -> str:
    for var in ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMI_RANK"):
        if var in os.environ:
            return os.environ[var]
    return "0"


def main() -> int:
    outdir, args = sys.argv[1], sys.argv[2:]
    os.makedirs(outdir, exist_ok=True)
    log = open(os.path.join(outdir, f"rank{_rank()}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    import pytest

    code = int(pytest.main(args))
    log.flush()
    if code != 0:
        # Leave at once: a rank whose peer failed must not hang in shutdown hooks; the launcher
        # then stops the other ranks.
        os._exit(code)
    if "horovod.torch" in sys.modules:
        sys.modules["horovod.torch"].shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
