"""SIGTERM/SIGINT handling: the first signal asks the loop to checkpoint and exit cleanly at the end of
the current step; a second one exits at once."""
from __future__ import annotations

import os
import signal


class StopRequest:
    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            print(f"\nsecond {signal.Signals(signum).name}: exiting immediately", flush=True)
            os._exit(128 + signum)
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then "
              f"exiting (send again to exit immediately)", flush=True)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
