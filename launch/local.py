"""Several JAX processes on this host forming one multi-controller job (CPU devices, gloo collectives).

    python -m launch.local --processes 2 --devices-per-process 4 -- --config configs/cpu_tiny.py [...]

Starts ``--processes`` copies of ``python -m train <train args> --config.multiprocess=True
--config.cpu_devices=K``. Each learns its place in the job from the environment, as on any cluster that
``jax.distributed.initialize()`` does not auto-detect: ``JAX_COORDINATOR_ADDRESS`` (127.0.0.1 and a free
port; process 0 runs the coordinator), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.

Output: every line of every process, prefixed with ``[p<i>]``. Signals: SIGINT/SIGTERM to the launcher
are forwarded to all processes as SIGTERM (the first one makes the run checkpoint and exit 0 at a step all
processes agree on; a second one exits at once). The children run in their own sessions so that a
terminal's Ctrl-C reaches them once, through the launcher. If a process fails (non-zero exit), the others
are killed: a multi-controller job cannot go on, nor checkpoint, without one of its processes.

Exit code: 0 if every process exited 0, else the worst exit code of the processes that ended on their own
(death by a signal N, counted as 128 + N, is worse than a failure, which is worse than bad input, 2; among
equals the first process's); the processes the launcher killed after a failure do not count.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

_SPLIT = re.compile(rb"[\r\n]")
_NOISE = re.compile(rb"^\[Gloo\] Rank \d+ is connected to \d+ peer ranks")  # one line per communicator


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class _Printer:
    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            self.stream.write(text + "\n")
            self.stream.flush()


def _pump(proc: subprocess.Popen, prefix: str, out: _Printer) -> None:
    """Copy a child's output line by line (carriage returns of progress bars end a line too)."""
    buf = b""
    fd = proc.stdout.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = _SPLIT.split(buf)
        for line in lines:
            if line.strip() and not _NOISE.match(line):
                out.line(prefix + line.decode(errors="replace"))
    if buf.strip():
        out.line(prefix + buf.decode(errors="replace"))


def _start(cmd: list[str], processes: int, address: str, out: "_Printer", what: str):
    """Start the job's processes (process i with JAX_PROCESS_ID=i) and a thread each that prefixes and prints
    its output; returns (processes, threads)."""
    procs, threads = [], []
    for i in range(processes):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(i), PYTHONUNBUFFERED="1")
        env.setdefault("TQDM_MININTERVAL", "5")  # progress bars become log lines here: fewer of them
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, start_new_session=True)
        procs.append(p)
        out.line(f"[launch] process {i}/{processes}: pid {p.pid}, {what}, coordinator {address}")
        t = threading.Thread(target=_pump, args=(p, f"[p{i}] ", out), daemon=True)
        t.start()
        threads.append(t)
    return procs, threads


def launch(processes: int, devices_per_process: int, args: list[str], *, module: str = "train",
           port: int = 0, grace: float = 10.0, stream=None) -> int:
    """Run the job; returns its exit code (see the module docstring)."""
    if processes < 1 or devices_per_process < 1:
        raise ValueError("--processes and --devices-per-process must be >= 1")
    out = _Printer(stream or sys.stdout)
    address = f"127.0.0.1:{port or free_port()}"
    cmd = [sys.executable, "-m", module, *args, "--config.multiprocess=True",
           f"--config.cpu_devices={devices_per_process}"]
    procs, threads = _start(cmd, processes, address, out, f"{devices_per_process} CPU devices")

    def forward(signum, frame):
        out.line(f"[launch] {signal.Signals(signum).name}: forwarding SIGTERM to all processes")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    killed = set()  # the processes this launcher killed after another one failed
    try:
        while any(p.poll() is None for p in procs):
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is not None and not killed:
                out.line(f"[launch] process {failed} failed with exit code {_exit_code(procs[failed].returncode)}; "
                         "killing the others")
                killed = {i for i, q in enumerate(procs) if q.poll() is None}
                for i in killed:
                    procs[i].kill()
            time.sleep(0.05)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        deadline = time.time() + grace
        for p in procs:  # only reached early by an exception in the launcher itself
            if p.poll() is None:
                p.kill()
        for t in threads:
            t.join(max(0.0, deadline - time.time()))
    codes = [_exit_code(p.returncode) for p in procs]
    code = job_exit_code(codes, killed)
    out.line(f"[launch] done: exit codes {codes} -> {code}")
    return code


def job_exit_code(codes: list[int], killed: set[int]) -> int:
    """The job's exit code: the worst of the processes' ``codes`` but those in ``killed`` (module docstring)."""
    def severity(code: int) -> int:  # success, bad input (2), a failure, death by a signal (>= 128)
        return 0 if code == 0 else 1 if code == 2 else 3 if code >= 128 else 2

    return max((c for i, c in enumerate(codes) if i not in killed), key=severity, default=0)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" in argv:
        split = argv.index("--")
        own, rest = argv[:split], argv[split + 1:]
    else:
        own, rest = argv, []
    parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --processes N --devices-per-process K [options] -- "
                                           "<train args>")
    parser.add_argument("--processes", type=int, required=True, help="JAX processes to start")
    parser.add_argument("--devices-per-process", type=int, required=True, help="simulated CPU devices each")
    parser.add_argument("--module", default="train", help="python module to run (default: train)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds to wait for log output at the end")
    a = parser.parse_args(own)
    return launch(a.processes, a.devices_per_process, rest, module=a.module, port=a.port, grace=a.grace)


if __name__ == "__main__":
    sys.exit(main())
