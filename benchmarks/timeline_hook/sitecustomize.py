"""Imported at start-up by the silo processes `benchmarks/critical_path.py`
starts (this folder and the repository are put first on their PYTHONPATH):
installs `benchmarks/_timeline.py`'s recorder; SIGUSR1 starts recording,
SIGUSR2 stops and writes `<TFF_AMQP_TIMELINE_DIR>/<pid>.json`. Nothing
happens without that variable."""

import os
import signal

_DIR = os.environ.get("TFF_AMQP_TIMELINE_DIR")

if _DIR:
    from pathlib import Path

    from benchmarks import _timeline

    _timeline.install()
    signal.signal(signal.SIGUSR1, lambda signum, frame: _timeline.start())
    signal.signal(
        signal.SIGUSR2,
        lambda signum, frame: _timeline.dump(Path(_DIR) / f"{os.getpid()}.json"),
    )
