"""User-facing errors: the CLI prints them as one line, never as a traceback."""


class DreamError(Exception):
    """Bad input or configuration, described in one line that names what is wrong.

    same_on_every_rank: every process of a torchrun job raises it alike (it follows from the command line
    or the shared run folder), so rank 0 alone reports it."""

    def __init__(self, message: str, same_on_every_rank: bool = False):
        super().__init__(message)
        self.same_on_every_rank = same_on_every_rank


class Stopped(KeyboardInterrupt):
    """The processes of a torchrun job stopping on a signal (or their launcher's death) that at least one of them
    saw. `why`: "SIGTERM", "interrupted", ... same_on_every_rank: they agreed to stop together, and rank 0 alone
    says it."""

    def __init__(self, signum: int, why: str, same_on_every_rank: bool = True):
        super().__init__(why)
        self.signum, self.why, self.same_on_every_rank = signum, why, same_on_every_rank


def option_error(field: str, wanted: str, value, flag: str | None = None) -> DreamError:
    """"--lambda-max must be in [0, 1], got 1.2": a config field named as its command-line flag (by default
    --field-name)."""
    flag = flag or f"--{field.replace('_', '-')}"
    return DreamError(f"{flag} must be {wanted}, got {value!r}", same_on_every_rank=True)


def out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, or the host's: the CPU allocator's RuntimeError ("... can't allocate memory")
    or Python's MemoryError."""
    import torch

    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))
