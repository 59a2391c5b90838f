"""`musicrl finetune rollback VERSION` (the real CLI: its signal handling and the deploy) with the install paused
at the weights, so a test can signal it mid-deploy. For tests/integration/test_finetune_deploy.py.

Usage: python deploy_in_subprocess.py VERSION MARKER PAUSE_S   (settings from the MUSICRL_* environment)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from serving import model_repository

version, marker, pause_s = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
copy2 = model_repository.shutil.copy2


def slow_copy2(source, destination, **kwargs):
    if Path(source).name == "weights.pt" and ".staging" in str(destination):
        marker.write_text("installing")  # the version's files are half written now
        time.sleep(pause_s)
    return copy2(source, destination, **kwargs)


model_repository.shutil.copy2 = slow_copy2

from finetune_worker.cli import app  # noqa: E402

app(["rollback", version])
