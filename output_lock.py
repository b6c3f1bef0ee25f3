"""One run per output folder: the lock file that a training run holds in its --output-dir (who owns it, its
heartbeat, when a stale one is taken over), and the check that the folder is writable before hours of training.
TrainRun (train_utils.py) takes it at the start; cli.run_main releases it at the end.
"""
import contextlib, json, os, signal, socket, sys, threading, time
import weakref
from pathlib import Path

from cli import Requeue, UserError, _created_folders, _locks, stop_signal

LOCK_FILE = ".lock"  # in the output folder while a run trains there
LOCK_HEARTBEAT_S = 30  # the owner refreshes the lock file's modification time this often
LOCK_STALE_S = 300  # another host's lock whose heartbeat is older than this is stale: its owner was killed
LOCK_UNWRITTEN_S = 10  # an empty or unreadable lock older than this is stale: its owner writes it at once


def check_output_dir(path, prepare=None):
    """Create the output directory and check that it is writable before hours of training; prepare(path) runs in
    between (TrainRun: the lock, then the clean-up of what a killed save left). The folders it creates are noted:
    run_main removes them again if the run ends with them empty (refused, or stopped before its first save)."""
    path = Path(path)
    try:
        _created_folders[:0] = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
        path.mkdir(parents=True, exist_ok=True)
        if prepare is not None:
            prepare(path)
        probe = path / f".write_test{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {path} is not writable ({e.strerror or e})") from None
    return path


def process_start(pid):
    """(alive, start) of process `pid` of this host; start: its start time in clock ticks since boot on Linux (tells a
    reused pid apart), None where unknown. A zombie (ended, not yet reaped) is not alive."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "pid (command)"
        return fields[0] != "Z", fields[19]
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:  # alive, another user's
        pass
    return True, None


def lock_heartbeat(path, stop):
    while not stop.wait(LOCK_HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


def release_lock(path, stop, mine):
    stop.set()
    with contextlib.suppress(OSError):
        if path.read_text() in ("", mine):  # still ours (empty: created, never written)
            path.unlink()


class OutputLock:
    """One run per output folder: output-dir/.lock names its owner (host, boot id, pid, start time), written when
    it is created; a thread refreshes its modification time (the heartbeat) every LOCK_HEARTBEAT_S. Taken over from
    this process, from an ended process of this host (pid gone or reused, or a reboot), when empty or unreadable
    LOCK_UNWRITTEN_S after its last change (a run killed while taking it), or from another host once its heartbeat
    is LOCK_STALE_S old (waited for; refused if the owner is alive by then). Refusals, a stale lock that cannot be
    removed and a stop signal while waiting are one line. Removed by `release` or when the process ends."""
    def __init__(self, folder):
        self.path = Path(folder) / LOCK_FILE
        boot = Path("/proc/sys/kernel/random/boot_id")
        self.me = {"host": socket.gethostname(), "boot": boot.read_text().strip() if boot.exists() else "",
                   "pid": os.getpid(), "start": process_start(os.getpid())[1],
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        waited, said = 0.0, False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # atomic, also on NFS
            except FileExistsError:
                text, who, state = self.holder()
            else:
                with open(fd, "w") as f, contextlib.suppress(OSError):  # a full disk: written by start(), after the
                    f.write(json.dumps(self.me))                         # clean-up has freed some space
                break
            if state in ("ours", "ended"):
                if state == "ended" and text is not None:
                    print(f"warning: taking over the lock of {who}: that run has ended", file=sys.stderr, flush=True)
                try:
                    if self.path.read_text() == text:  # not replaced by another run meanwhile
                        self.path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:  # without this error the loop would try again and again
                    raise UserError(f"cannot remove the stale lock {self.path} of {who} ({e.strerror or e}): make "
                                    f"{self.path.parent} writable, or use another --output-dir") from None
                continue
            if state == "live" or waited >= LOCK_STALE_S:
                raise UserError(f"{self.path.parent} is in use by another run: {who}; wait for it to end or use "
                                f"another --output-dir")
            if stop_signal() is not None:
                raise Requeue(f"{signal.Signals(stop_signal()).name} while waiting for the lock of {who}; nothing "
                              f"was trained: run the same command again")
            if not said and state == "remote":
                print(f"{self.path.parent} is locked by {who} on another host: waiting up to {LOCK_STALE_S} s for "
                      f"its heartbeat to stop", flush=True)
                said = True
            poll = min(5.0, LOCK_STALE_S / 10, LOCK_UNWRITTEN_S / 10)
            time.sleep(poll)
            waited += poll
        self.stop = threading.Event()
        self.release = weakref.finalize(self, release_lock, self.path, self.stop, json.dumps(self.me))
        _locks.add(self)

    def holder(self):
        """(text of the lock file, its owner in words, state): 'ours' (this process), 'ended' (stale), 'live' (a
        process of this host), 'remote' (another host's, with a fresh heartbeat), 'unwritten' (empty or unreadable,
        changed less than LOCK_UNWRITTEN_S ago: its owner is writing it)."""
        try:
            text, age = self.path.read_text(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, "nobody", "ended"
        try:
            owner = json.loads(text)
        except ValueError:
            owner = None
        if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
            who = f"an {'empty' if not text else 'unreadable'} lock file (a run killed while taking it)"
            return text, who, "unwritten" if age < LOCK_UNWRITTEN_S else "ended"
        who = f"host {owner.get('host', '?')}, pid {owner['pid']}, started {owner.get('started', '?')}"
        if owner.get("host") != self.me["host"]:
            return text, who, "remote" if age < LOCK_STALE_S else "ended"
        if owner.get("boot") != self.me["boot"]:
            return text, who, "ended"  # the host rebooted since
        if owner["pid"] == self.me["pid"]:
            return text, who, "ours"
        alive, start = process_start(owner["pid"])
        return text, who, "live" if alive and start == owner.get("start") else "ended"

    def start(self):
        """Write the owner (again: on a full disk only the clean-up before this frees the space) and start beating."""
        self.path.write_text(json.dumps(self.me))
        threading.Thread(target=lock_heartbeat, args=(self.path, self.stop), daemon=True).start()
