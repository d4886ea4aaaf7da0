"""Imported at start-up by the silo processes `benchmarks/cpu_profile.py` starts
(this folder is put first on their PYTHONPATH): SIGUSR1 starts profiling the
main thread (the silo's event loop) by CPU time, SIGUSR2 stops and writes
`<TFF_AMQP_PROFILE_DIR>/<pid>.prof`. Nothing happens without that variable."""

import os
import signal

_DIR = os.environ.get("TFF_AMQP_PROFILE_DIR")

if _DIR:
    import cProfile
    import time

    _profile = cProfile.Profile(timer=time.thread_time)

    def _start(signum, frame):
        _profile.enable()

    def _stop(signum, frame):
        _profile.disable()
        _profile.dump_stats(os.path.join(_DIR, f"{os.getpid()}.prof"))

    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
