"""Run a command and report its peak memory, summed over the process and every process it starts
(DataLoader workers included), polled from /proc (Linux):

    python scripts/peak_memory.py -- python main.py --data-dir D --weights none --max-steps 5 --eval-every 0

RssAnon is the memory that only the processes hold (arrays, tensors, the heap): what a machine
must have. RSS adds the file pages they map (libraries, memory-mapped caches), which the system
can drop and read again. Polling every --interval seconds can miss a peak shorter than that; the
largest single process's exact peak RSS (the kernel's own count) is printed beside the sums.
"""
import argparse
import os
import subprocess
import sys
import time


def descendants(pid):
    """pid and every process below it, from /proc/PID/task/*/children."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:  # ended meanwhile
            continue
    return found


def status_kib(pid, fields):
    """{field: kiB} of /proc/PID/status; {} if the process has ended."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in fields:
                    values[name] = int(rest.split()[0])
    except (OSError, ValueError):
        return {}
    return values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interval", type=float, default=0.05, help="seconds between polls")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    child = subprocess.Popen(command)
    peak_anon = peak_rss = 0
    while True:
        anon = rss = 0
        for pid in descendants(child.pid):
            kib = status_kib(pid, ("RssAnon", "VmRSS"))
            anon, rss = anon + kib.get("RssAnon", 0), rss + kib.get("VmRSS", 0)
        peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
        if child.poll() is not None:
            break
        time.sleep(args.interval)
    # The largest peak RSS of the command or of any process it waited for (getrusage's ru_maxrss).
    import resource

    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"peak RssAnon, summed over the processes: {peak_anon * 1024 / 1e9:.2f} GB; peak RSS, summed: "
          f"{peak_rss * 1024 / 1e9:.2f} GB; largest single process's peak RSS: {largest * 1024 / 1e9:.2f} GB; "
          f"exit status {child.returncode}", file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
