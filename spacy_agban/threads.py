"""One torch thread in every forked child, so that ``nlp.pipe(n_process=2)`` never hangs.

spaCy's ``n_process > 1`` forks worker processes (on Linux). Once the parent has run
a torch op, torch's OpenMP thread pool exists in the parent; a forked child
inherits the pool's state but none of its threads, and its first multi-threaded
torch op then waits forever on threads that are not there: no error, no output.
A child that runs torch on one thread never enters that pool. Each forked worker
is one of ``n_process`` processes sharing the cores anyway, so one thread each is
also what it should use. A child that wants more calls ``torch.set_num_threads``
itself afterwards.
"""
import os
import sys

_installed = False


def _one_thread_in_child() -> None:
    torch = sys.modules.get("torch")
    # Without torch imported in the parent there is no pool to inherit.
    if torch is not None and torch.get_num_threads() > 1:
        torch.set_num_threads(1)


def install_fork_guard() -> None:
    """Register the after-fork hook once per process (idempotent)."""
    global _installed
    if _installed or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(after_in_child=_one_thread_in_child)
    _installed = True
