"""The pipeline's stages: `python -m stages.<name>` runs one (dvc.yaml says which, with what).

Run that way, a SIGINT or SIGTERM that arrives while the stage is still
importing ends it with one line: nothing is written yet, so there is nothing to
clean. Once its main() runs, common.run() takes over (and cleans up).
Run by DVC, it also notes which process is DVC (common.watch_dvc). Imported
by other code (the tests, a notebook), this changes nothing.
"""

import os
import signal
import sys


def _exit_while_starting(signum, frame):
    name = signal.Signals(signum).name
    os.write(2, f"error: interrupted by {name} while starting; nothing was written (run it again)\n".encode())
    os._exit(128 + signum)


if sys.argv[:1] == ["-m"]:  # Python sets argv[0] to "-m" while it imports the package of `python -m stages.x`
    signal.signal(signal.SIGINT, _exit_while_starting)
    signal.signal(signal.SIGTERM, _exit_while_starting)
    if os.environ.get("DVC_STAGE"):  # run by DVC: find it now, before the seconds of imports it could die in
        from stages import common
        common.DVC_PROCESS = common.dvc_ancestor()
