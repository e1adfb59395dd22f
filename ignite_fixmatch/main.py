"""Command line: ``python -m ignite_fixmatch.main CONFIG.yaml [key=value ...]``.

Reads and checks the config, checks every handler (before torch is even imported), then hands ``training`` to
``ignite.distributed.Parallel``, which runs it in this process (CPU or one GPU), spawns
``dist.nproc_per_node`` processes, joins a multi-node job, or picks up what ``torchrun`` set up.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

# Only light modules here: the config and the handler list are checked before torch is imported
# (about 2.5 s), so a bad config is refused in about a second. Torch, Ignite and the training code
# load in run_job, once the config is known to be good.
from ignite_fixmatch.config import Config, ConfigError, load_config
from ignite_fixmatch.errors import (  # noqa: F401  (the exit codes are part of this command's interface)
    EXIT_CODES,
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    EXIT_PROCESS_DIED,
    EXIT_SAVE_FAILED,
    EXIT_USER_ERROR,
    error_line,
    exit_code_of,
)
from ignite_fixmatch.plugins import plan_handlers


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ)


def parallel_kwargs(cfg: Config) -> dict:
    """Arguments of idist.Parallel for this config (and for torchrun, what its environment says)."""
    d = cfg.dist
    backend = d.backend
    if backend is None and launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        check_nccl(d.nproc_per_node if not launched_by_torchrun() else None)
    kwargs: dict = {"backend": backend}
    if backend is not None:
        kwargs["timeout"] = timedelta(seconds=d.timeout_s)
    if d.nproc_per_node is not None and not launched_by_torchrun():
        if backend is None:
            raise ConfigError(
                f"config key 'dist.nproc_per_node': got {d.nproc_per_node}, which needs dist.backend ('nccl' on GPUs, 'gloo' on CPU)."
            )
        kwargs.update(nproc_per_node=d.nproc_per_node, nnodes=d.nnodes, node_rank=d.node_rank)
        if d.master_addr is not None:
            kwargs["master_addr"] = d.master_addr
        if d.master_port is not None:
            kwargs["master_port"] = d.master_port
    return kwargs


def check_nccl(nproc_per_node: int | None) -> None:
    """nccl runs one process per GPU: refuse it here, in one line, rather than in every spawned process."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        raise ConfigError("config key 'dist.backend': got 'nccl', which needs CUDA GPUs and none is visible. Use dist.backend=gloo on CPU.")
    if nproc_per_node is not None and nproc_per_node > gpus:
        raise ConfigError(
            f"config key 'dist.nproc_per_node': got {nproc_per_node}, but only {gpus} GPU(s) are visible on this node "
            "(nccl runs one process per GPU). Lower dist.nproc_per_node, or check CUDA_VISIBLE_DEVICES."
        )


def spawned_training(local_rank: int, cfg: Config) -> None:
    """What each process spawned by Ignite runs. A known error (bad data, preemption, ...) is printed as
    one line and ends this process with its exit code; the launcher then stops the other processes."""
    import ignite.distributed as idist

    try:
        training_with_clean_exit(local_rank, cfg)
    except tuple(EXIT_CODES) as e:
        print(f"error (process {idist.get_rank()} of {idist.get_world_size()}): {error_line(e)}", file=sys.stderr, flush=True)
        sys.exit(exit_code_of(e))


def training_with_clean_exit(local_rank: int, cfg: Config) -> None:
    """``training``, then its loader workers stopped however it ended: workers ignore SIGTERM, so any
    left running would make the exit of this process (spawned ones run no atexit hooks) wait forever."""
    from ignite_fixmatch.data import shutdown_loader_workers
    from ignite_fixmatch.training import training

    try:
        training(local_rank, cfg)
    finally:
        shutdown_loader_workers()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ignite_fixmatch.main",
        description="Train FixMatch. Any config value can be overridden: optim.lr=0.01 data.num_labels=250 output_dir=runs/x",
    )
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value pairs, dotted keys, values read as YAML")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        plan_handlers(cfg.handlers)  # every handler built and ordered: a typo or a missing dependency fails here, in one line
        return run_job(cfg)
    except tuple(EXIT_CODES) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return exit_code_of(e)


def run_job(cfg: Config) -> int:
    """Hand the checked config to ``idist.Parallel``: here (CPU, one GPU, torchrun) or spawned processes."""
    import ignite.distributed as idist
    from torch.multiprocessing import ProcessExitedException

    try:
        kwargs = parallel_kwargs(cfg)
        with idist.Parallel(**kwargs) as parallel:
            parallel.run(spawned_training if "nproc_per_node" in kwargs else training_with_clean_exit, cfg)
    except ProcessExitedException as e:  # a spawned process ended; the launcher stopped the others
        if e.exit_code in EXIT_CODES.values():  # a known error, already printed by that process
            return e.exit_code
        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
        print(
            f"error: process {e.error_index} of the job {how}; the other processes were stopped. "
            "Continue from the last checkpoint with resume=auto.",
            file=sys.stderr,
        )
        return EXIT_PROCESS_DIED
    return 0


if __name__ == "__main__":
    sys.exit(main())
