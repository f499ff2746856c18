"""Multi-process jobs under torchrun: one process per device.

    torchrun --nproc-per-node 8 -m dream train ...         (NCCL on GPUs; gloo with --device cpu)
    torchrun --nproc-per-node 8 -m dream sample ...        (also dream eval)

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a command runs in one process and every
function here is a no-op. Training runs DistributedDataParallel: rank 0 does all file I/O (checkpoints,
logs, sample grids, the progress bar), and each rank sees batch_size / world_size images of every global
batch, so the effective batch and the data order (and hence the result, up to floating-point summation
order) do not depend on world_size. Sampling deals the batches still to make out to the ranks; each
batch's images depend on the seed and the batch's index alone, so the set does not depend on world_size.
"""
from __future__ import annotations

import os
import re
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dream.errors import DreamError


LAUNCHER_GONE = 1000  # a stop reason beside the signal numbers (the ranks agree on the largest one)


def local_processes() -> int:
    """How many processes of this job run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        return 1


def stop_reason(signum: int) -> str:
    """How a stop is said: "SIGTERM", "interrupted" (SIGINT: Ctrl-C), or that the launcher is gone."""
    if signum == LAUNCHER_GONE:
        return "the launcher (torchrun) is gone"
    return "interrupted" if signum == signal.SIGINT else signal.Signals(signum).name


class StopFlag:
    """SIGINT and SIGTERM set a flag; the loop finishes (or drops) its step, and the ranks stop together. A second
    SIGINT (Ctrl-C pressed again in a single process; torchrun forwards only the first) raises KeyboardInterrupt
    at once."""

    def __init__(self):
        self.requested = False
        self.signum = 0

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    @contextmanager
    def installed(self):
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self.handle)
        except ValueError:  # not the main thread: no signal handling
            pass
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher_pid: int = 0  # the process that started this one (torchrun's agent); 0: not checked

    def launcher_gone(self) -> bool:
        """Whether the launcher has died (killed with SIGKILL, say, so it could not stop its workers): this
        process was re-parented. Its workers then stop as on SIGTERM rather than train on unwatched, into a
        run folder that a rerun of the command would share."""
        return self.launcher_pid > 0 and os.getppid() != self.launcher_pid

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives; each is the identity in a single process --------------------------------
    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a tensor (every rank gets it)."""
        if not self.enabled:
            return values
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values / self.world_size

    def max(self, value: int, device) -> int:
        """The largest of an int over ranks, on every rank (e.g. the number of a stop signal that only
        some ranks saw, 0 on the others)."""
        if not self.enabled:
            return value
        return int(self.max_tensor(value, device).item())

    def max_tensor(self, value: int, device) -> torch.Tensor:
        """max() as a one-element int64 tensor on `device`, not read on the host: queued like any other work."""
        return self._reduced(value, device, dist.ReduceOp.MAX)

    def _reduced(self, value: int, device, op) -> torch.Tensor:
        tensor = torch.full((1,), value, dtype=torch.int64, device=device)  # a fill, not a host-to-device copy
        if self.enabled:
            dist.all_reduce(tensor, op=op)
        return tensor

    def check_identical(self, tensors: list[torch.Tensor], what: str) -> None:
        """Raise unless `tensors` are bitwise equal on every rank (compares a 64-bit fingerprint)."""
        if not self.enabled:
            return
        fingerprint = torch.stack([fingerprint_tensor(t) for t in tensors]).sum().reshape(1)
        device = tensors[0].device if tensors else torch.device("cpu")
        gathered = [torch.zeros_like(fingerprint) for _ in range(self.world_size)]
        dist.all_gather(gathered, fingerprint.to(device))
        values = [int(g.item()) for g in gathered]
        if len(set(values)) != 1:
            raise RuntimeError(f"{what} differ between ranks (fingerprints {values}); the ranks have diverged")

    def gather_flags(self, flag: bool) -> list[bool]:
        """Every rank's flag, on every rank (the one flag in a single process)."""
        if not self.enabled:
            return [bool(flag)]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flags = torch.zeros(self.world_size, dtype=torch.int64, device=device)
        flags[self.rank] = int(bool(flag))
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        return [bool(value) for value in flags.tolist()]

    def sum(self, value: int, device) -> int:
        """The sum of an int over ranks, on every rank."""
        if not self.enabled:
            return value
        return int(self._reduced(value, device, dist.ReduceOp.SUM).item())

    def share(self, value):
        """Rank 0's value (any picklable object) on every rank."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def leave(self) -> None:
        """Leave the process group once every rank is here: what follows runs in each process alone (rank 0's
        FID computation, say, which would otherwise hold the others in a collective for its whole length)."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


SETUP_ERRORS = (DreamError, ValueError, OSError, KeyboardInterrupt)  # (KeyboardInterrupt: also SIGTERM)


def agree_on_setup(d: Distributed, failure: BaseException | None) -> None:
    """Raise this rank's setup error (None: it has none) so that each is reported once. Under torchrun the
    ranks first tell each other whether they failed: when every rank failed (a bad flag, shared data), rank 0
    alone reports its error; when some did, each of those reports its own and rank 0 names them. A ValueError
    (a bad model setting, a backend that cannot run here) becomes a one-line DreamError. A signal (Ctrl-C,
    SIGTERM) is shared the same way."""
    if isinstance(failure, ValueError):
        failure = DreamError(str(failure))
    failed = d.gather_flags(failure is not None)
    if failure is not None:
        failure.same_on_every_rank = all(failed)
        raise failure
    if any(failed):
        ranks = ", ".join(str(rank) for rank, flag in enumerate(failed) if flag)
        raise DreamError(f"the process of rank {ranks} stopped during setup (its line says why)",
                         same_on_every_rank=True)


@contextmanager
def agreed_setup(d: Distributed):
    """`with agreed_setup(d):` around setup work that may fail on some ranks only (rank 0's alone, say): a
    setup error (SETUP_ERRORS) is raised on every rank through agree_on_setup. In one process it is a no-op."""
    if not d.enabled:
        yield
        return
    failure = None
    try:
        yield
    except SETUP_ERRORS as error:
        failure = error
    agree_on_setup(d, failure)


def fingerprint_tensor(t: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """An int64 that changes with any bit of t: sum_i word_i * (i % P + 1) over its 32-bit words
    (16- and 8-bit types widened exactly), in chunks so that the temporaries stay small."""
    words = t.detach().contiguous().reshape(-1)
    if words.element_size() % 4 == 0:
        words = words.view(torch.int32)
    else:
        words = words.view(torch.int16 if words.element_size() == 2 else torch.uint8)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), chunk):
        part = words[start:start + chunk].to(torch.int64)
        position = torch.arange(start, start + part.numel(), device=words.device, dtype=torch.int64) % 1_000_003 + 1
        total += (part * position).sum()
    return total


def from_environment(device_name: str, timeout: timedelta | None = None) -> Distributed:
    """Join the process group torchrun describes in the environment; a single process otherwise. `timeout`: how
    long a collective may wait for the other ranks (None: torch's default, 10 minutes with NCCL)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device_name != "cpu" and not device_name.startswith("cpu") and torch.cuda.is_available()
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise DreamError(f"device {device_name!r} was asked for, but CUDA is not available on this machine",
                         same_on_every_rank=True)
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DreamError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", **({"timeout": timeout} if timeout else {}))
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, launcher_pid=os.getppid())


def peer_lost(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process of the job is gone (it stopped on an
    error, was killed, or its machine went away): torch.distributed's DistNetworkError, gloo's and NCCL's
    lost-connection errors (not NCCL's other errors, which may be this process's own). Such an error says
    nothing about this process; the other one says what happened."""
    if isinstance(error, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(error) if isinstance(error, RuntimeError) else ""
    return any(marker in text for marker in ("Connection closed by peer", "Connection reset by peer",
                                             "remote process exited or there was a network error"))


def peer_lost_summary(error: BaseException) -> str:
    """The gist of a peer_lost error: its type and first line, less gloo's source location and advice."""
    text = (str(error).splitlines() or [""])[0]
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text).split(". This is typically")[0]
    return f"{type(error).__name__}: {text}"


# sampling and evaluation: ranks wait in a collective while rank 0 alone prepares the real set (a first decode,
# the feature extractor) and, at the end, while the others finish their last batch (a 1000-step batch can take
# minutes); a rank that dies breaks the connection (gloo) or is stopped by torchrun well before this
SAMPLING_TIMEOUT = timedelta(hours=2)


@contextmanager
def session(device_name: str, timeout: timedelta | None = None):
    """`with session(device) as d:` joins the process group (if any) and leaves it on exit.

    On a normal exit the ranks meet at a barrier first, so that no rank tears its connections down
    while another still works (rank 0 saving a result, say); after an exception each rank leaves at
    once, since the others may never reach the barrier."""
    d = from_environment(device_name, timeout)
    try:
        yield d
    except BaseException:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
