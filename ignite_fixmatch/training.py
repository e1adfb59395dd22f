"""``training(local_rank, cfg)``: one process of a run, from config to a finished Ignite run.

Order matters and is the same on every start, new or resumed: seed, output folder, data, model,
optimizer, trainer, handlers (built and validated first), then the checkpoint is loaded into the one
``to_save`` dict that the checkpoint handler also saves, and the trainer runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.utils import manual_seed, setup_logger

from ignite_fixmatch.algorithms import build_algorithm
from ignite_fixmatch.augment.ctaugment import CTAugmentViews
from ignite_fixmatch.augment.cuda_graph import CudaGraphed
from ignite_fixmatch.config import Config, ConfigError, check_divisible, dump_yaml
from ignite_fixmatch.data import FixMatchData, FixMatchStream, build_data, build_eval_loader, class_counts, save_split, sources_from_config
from ignite_fixmatch.device_data import DeviceEvalBatches, DeviceResidentStream
from ignite_fixmatch.errors import OutputDirError
from ignite_fixmatch.models import build_model
from ignite_fixmatch.output_files import write_atomically
from ignite_fixmatch.plugins import Context, attach_all, build_handlers
from ignite_fixmatch.preemption import PreemptionGuard
from ignite_fixmatch.preprocessing import Preprocessing
from ignite_fixmatch.resume import (
    CHECKPOINT_DIR,
    CheckpointError,
    ClassesRecord,
    ConfigRecord,
    RNGState,
    find_resume_checkpoint,
    load_into,
    newest_checkpoint,
    read_checkpoint,
    shape_mismatches,
)
from ignite_fixmatch.resume_policy import check_resume_config
from ignite_fixmatch.resume_policy import describe as describe_changes
from ignite_fixmatch.run_folder import take_run_folder
from ignite_fixmatch.trainer import amp_enabled, create_trainer, needs_grad_scaler, parameter_groups, resolve_amp_dtype

LOGGER_NAME = "ignite_fixmatch"


def prepare_output_dir(cfg: Config) -> Path:
    """Check, lock and create the run's folder (rules in :mod:`ignite_fixmatch.run_folder`): only a folder of
    our own is ever cleared, a failed start's leftovers are replaced, and one run at a time holds it."""
    return take_run_folder(cfg.output_dir, cfg.resume, cfg.overwrite, [cfg.data.root, cfg.data.unlabeled_dir])


def decide_on_rank_zero(decide: Callable[[], str], error: type[Exception]) -> str:
    """Run ``decide`` on rank 0 and give every rank its result, or raise its error on every rank
    (an error raised on rank 0 alone would leave the others waiting in the broadcast)."""
    result = ""
    if idist.get_rank() == 0:
        try:
            result = decide()
        except error as e:
            result = "ERROR:" + str(e)
    if idist.get_world_size() > 1:
        result = idist.broadcast(result, src=0, safe_mode=True)
    if result.startswith("ERROR:"):
        raise error(result[len("ERROR:") :])
    return result


def shared_output_dir(cfg: Config) -> Path:
    """Rank 0 decides (and creates) the folder; every rank gets the same path or the same error."""
    return Path(decide_on_rank_zero(lambda: str(prepare_output_dir(cfg)), OutputDirError))


def shared_resume_checkpoint(cfg: Config, output_dir: Path) -> Path | None:
    """Rank 0 picks the checkpoint; every rank loads that same file, or every rank gets the same error.

    A rank that cannot see the file (nodes without a shared output_dir) stops with a clear error instead
    of starting from scratch while the others resume, which would desynchronise the job. With
    ``resume=auto`` rank 0 reads the candidates and skips damaged ones with a warning in the log.
    """
    if cfg.resume is None:
        return None

    def pick() -> str:
        found = find_resume_checkpoint(cfg.resume, output_dir, warn=logging.getLogger(LOGGER_NAME).warning)
        return str(found.resolve()) if found is not None else ""

    result = decide_on_rank_zero(pick, CheckpointError)
    if not result:
        return None
    if not Path(result).is_file():
        raise CheckpointError(
            f"process {idist.get_rank()} cannot read {result!r}, the checkpoint process 0 resumes from. With several "
            "nodes, output_dir (and any resume= path) must be on a filesystem that every node mounts at the same path."
        )
    return Path(result)


def attach_step_timer(trainer: Engine) -> None:
    """Seconds spent waiting for data and in the update, on ``trainer.state.data_time/step_time``."""
    marks: dict[str, float] = {}

    @trainer.on(Events.GET_BATCH_STARTED)
    def _batch_started(_: Engine) -> None:
        marks["batch"] = time.perf_counter()

    @trainer.on(Events.GET_BATCH_COMPLETED)
    def _batch_completed(engine: Engine) -> None:
        marks["step"] = time.perf_counter()
        engine.state.data_time = marks["step"] - marks["batch"]

    @trainer.on(Events.ITERATION_COMPLETED)
    def _step_completed(engine: Engine) -> None:
        engine.state.step_time = time.perf_counter() - marks.get("step", time.perf_counter())


def attach_buffer_sync(trainer: Engine, model: torch.nn.Module) -> None:
    """After every step, give every rank rank 0's buffers (batch-norm statistics).

    DDP copies them from rank 0 only at the start of a forward, so after a step each rank holds the
    statistics of its own shard. The EMA copy shares (or averages) these buffers, and each rank evaluates
    its test shard with them: without this sync the ranks would score slightly different models, none of
    them exactly the one rank 0 checkpoints. Registered before the handlers, so they all see synced buffers.
    """
    buffers = [b for b in getattr(model, "module", model).buffers() if b.is_floating_point()]
    if idist.get_world_size() == 1 or not buffers:
        return

    @trainer.on(Events.ITERATION_COMPLETED)
    def _sync(_: Engine) -> None:
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        torch.distributed.broadcast(flat, src=0)  # one collective for all of them
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = parameter_groups(model, o.weight_decay, o.wd_rule)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


def check_sync_bn(cfg: Config, world_size: int, device: torch.device) -> None:
    """torch's SyncBatchNorm runs on GPUs only: refuse it at start, not at the first forward of a CPU job."""
    if cfg.model.sync_bn and world_size > 1 and device.type != "cuda":
        raise ConfigError(
            f"config key 'model.sync_bn': got true, but this run is on {device.type} and torch's SyncBatchNorm needs "
            "CUDA GPUs. Set model.sync_bn=false (each process then normalises its own share of the batch)."
        )


def model_from_config(cfg: Config, num_classes: int, in_channels: int) -> torch.nn.Module:
    """The run's network, before any DDP wrapping; shared with ``ignite_fixmatch.eval`` so a checkpoint
    is loaded into exactly the model that wrote it."""
    m = cfg.model
    model = build_model(
        m.name, num_classes, in_channels=in_channels, depth=m.depth, widen_factor=m.widen_factor,
        dropout=m.dropout, leaky_slope=m.leaky_slope, bn_momentum=m.bn_momentum, shortcut_variant=m.shortcut_variant,
    )
    return model.to(memory_format=torch.channels_last) if m.channels_last else model


def warm_start(model: torch.nn.Module, init_from: str, classes: list[str], logger: logging.Logger) -> None:
    """``model.init_from``: load a checkpoint's weights (its EMA model when saved, else the raw one) into a new
    run's model. Only weights: the optimizer, LR schedule and iteration count start fresh. Another shape is
    refused by name (CheckpointError); other class names of the same count are allowed (fine-tuning) and logged."""
    from ignite_fixmatch.eval import resolve_checkpoint  # eval imports this module

    try:
        path = resolve_checkpoint(Path(init_from))
    except CheckpointError as e:
        raise CheckpointError(f"model.init_from: {e}") from None
    ckpt = read_checkpoint(path, required=("model",))
    which = "ema_model" if isinstance(ckpt.get("ema_model"), Mapping) else "model"
    problems = shape_mismatches(model, ckpt[which])
    if problems:
        raise CheckpointError(
            f"model.init_from: checkpoint {str(path)!r} does not fit this run's model: {problems}. Warm start from a run of "
            "the same model (model.*) and number of classes, or unset model.init_from to start from random weights."
        )
    try:
        model.load_state_dict(ckpt[which])
    except Exception as e:  # noqa: BLE001 - a damaged state dict fails in any way
        raise CheckpointError(f"model.init_from: checkpoint {str(path)!r} cannot be loaded, the file is damaged ({type(e).__name__}).") from None
    record = ckpt.get("classes")
    saved = list(record.get("classes", [])) if isinstance(record, Mapping) else []
    if saved and saved != list(classes):
        logger.warning("model.init_from: the checkpoint was trained on classes %s, this run's are %s: its classifier is reused as is",
                       ", ".join(map(str, saved[:10])), ", ".join(classes[:10]))
    trainer_state = ckpt.get("trainer")
    iteration = trainer_state.get("iteration") if isinstance(trainer_state, Mapping) else None
    logger.info("Warm start: weights of %s (%s, iteration %s); new optimizer, LR schedule and iteration count",
                path, "EMA" if which == "ema_model" else "raw", iteration)


AUGMENT_WHERE = {
    "pil": "PIL per image in the loader workers",
    "batched": "batched on the device (loaders carry uint8 images)",
    "device": "batched on the device (data set held there)",
}
CTA_WHERE = {  # CTAugment's ops need this step's weights: the training process applies them on every path
    "pil": "CTAugment, PIL per image in the training process (loaders carry uint8 images and draws)",
    "batched": "CTAugment, batched on the device (loaders carry uint8 images and draws)",
    "device": "CTAugment, batched on the device (data set held there)",
}


CPU_COMPILE_MIN_ITERS = 10_000


def compile_enabled(cfg: Config, device: torch.device) -> bool:
    """``model.compile: auto``: on a GPU; on a CPU only for runs of at least CPU_COMPILE_MIN_ITERS
    iterations, where about a minute of compiling buys about 1.3x (WRN-28-2, channels_last, this
    project's 2-core benchmark) for the rest of the run; a short run would spend longer compiling."""
    if cfg.model.compile != "auto":
        return cfg.model.compile == "on"
    return device.type == "cuda" or cfg.train.num_iters >= CPU_COMPILE_MIN_ITERS


def augmentation_on_device(data: FixMatchData, cfg: Config, device: torch.device) -> Callable | None:
    """The trainer's batch_transform: the batched views, replayed as a CUDA graph where asked (auto: on a GPU)."""
    if data.batched is None:
        return None
    if isinstance(data.batched, CTAugmentViews):  # reads its policy on the host every step: not a fixed graph
        return data.batched
    if device.type == "cuda" and cfg.data.cuda_graph in ("auto", "on"):
        return CudaGraphed(data.batched)
    return data.batched


def training_data(
    data: FixMatchData, cfg: Config, rank: int, world_size: int, device: torch.device, start_iteration: Callable[[], int]
) -> tuple[Any, Any]:
    """(training stream, test batches) for where augmentation runs (``data.augment`` resolved)."""
    if data.augment == "device":
        stream = DeviceResidentStream(data, cfg.data.batch_size, cfg.data.mu, cfg.seed, rank, world_size, device, start_iteration)
        return stream, DeviceEvalBatches(data.sources.test, cfg.data.eval_batch_size, rank, world_size, device)
    pin = device.type == "cuda"
    stream = FixMatchStream(data, cfg, rank, world_size, start_iteration=start_iteration, pin_memory=pin)
    return stream, build_eval_loader(data.sources, cfg.data.eval_batch_size, min(cfg.data.num_workers, 2), rank, world_size, pin)


def log_class_counts(data: FixMatchData, cfg: Config, output_dir: Path, logger: logging.Logger) -> None:
    """Images per class, labeled / unlabeled, in the log; a long-tailed run (data.imbalance_ratio) also
    writes them to class_counts.json (written whole: a temporary file renamed into place)."""
    counts = class_counts(data)
    pairs = ", ".join(f"{name} {a}/{b}" for name, a, b in zip(counts["classes"], counts["labeled"], counts["unlabeled"]))
    extra = f" (and {counts['unlabeled_without_class']} unlabeled without a class)" if counts["unlabeled_without_class"] else ""
    logger.info("Images per class, labeled/unlabeled: %s%s", pairs, extra)
    if cfg.data.imbalance_ratio > 1:
        write_atomically(output_dir / "class_counts.json", lambda tmp: tmp.write_text(json.dumps(counts, indent=1) + "\n"))


def training(local_rank: int, cfg: Config) -> dict[str, Any]:
    """Run (or resume) one process of a FixMatch run. Returns the final results dict on rank 0."""
    rank, world_size, device = idist.get_rank(), idist.get_world_size(), idist.device()
    check_divisible(cfg, world_size)
    check_sync_bn(cfg, world_size, device)
    logger = setup_logger(LOGGER_NAME, level=logging.INFO, distributed_rank=rank, reset=True)
    handlers = build_handlers(cfg.handlers)  # a bad handler param fails here, before data or model
    output_dir = shared_output_dir(cfg)
    # Picked and checked against the config before anything is written: a refused resume leaves the folder as it was.
    checkpoint = shared_resume_checkpoint(cfg, output_dir)
    resume_changes = check_resume_config(cfg, checkpoint)
    if rank == 0:
        log_file = logging.FileHandler(output_dir / "train.log", encoding="utf-8")
        log_file.setFormatter(logger.handlers[0].formatter)
        logger.addHandler(log_file)
        text = dump_yaml(cfg)
        (output_dir / "config.yaml").write_text(text)
        logger.info("Run folder: %s\nResolved config:\n%s", output_dir, text)
        logger.info("Device: %s, processes: %d", device, world_size)

    # The same seed on every rank: identical initial weights, and the RNG state that rank 0 checkpoints is
    # right for every rank on resume. Data randomness differs per rank anyway (seeded by stream position).
    manual_seed(cfg.seed)
    with idist.one_rank_first(local=True):  # download once per node, the others wait
        sources = sources_from_config(cfg)
    data = build_data(cfg, sources)
    if rank == 0:
        save_split(output_dir / "labeled_indices.txt", data.labeled_indices)
        logger.info(
            "Data %s: %d labeled of %d training images, %d unlabeled, %d test, %d classes",
            cfg.data.name, len(data.labeled_indices), len(sources.train), len(data.unlabeled), len(sources.test), sources.num_classes,
        )
        log_class_counts(data, cfg, output_dir, logger)
        if len(data.val_indices):  # data.val_labels: held out of training, to calibrate on
            save_split(output_dir / "val_indices.txt", data.val_indices)
            logger.info("Held out %d labeled images (data.val_labels=%d per class): val_indices.txt", len(data.val_indices), cfg.data.val_labels)

    m = cfg.model
    compile_model = compile_enabled(cfg, device)
    torch.backends.cudnn.benchmark = m.cudnn_benchmark and device.type == "cuda"  # shapes are fixed from step to step
    batch_transform = augmentation_on_device(data, cfg, device)
    if rank == 0:
        amp = f"on ({str(resolve_amp_dtype(device, cfg.amp_dtype)).removeprefix('torch.')})" if amp_enabled(device, cfg.amp) else "off"
        logger.info(
            "Speed settings: augmentation %s%s, amp %s, channels_last %s, compile %s, cudnn.benchmark %s",
            (CTA_WHERE if isinstance(data.batched, CTAugmentViews) else AUGMENT_WHERE)[data.augment],
            " as a CUDA graph" if isinstance(batch_transform, CudaGraphed) else "",
            amp, "on" if m.channels_last else "off", f"on ({m.compile_mode})" if compile_model else "off",
            "on" if torch.backends.cudnn.benchmark else "off",
        )
    net = model_from_config(cfg, sources.num_classes, sources.channels)
    if m.init_from is not None and checkpoint is None:  # before DDP wraps it and the EMA handler copies it
        warm_start(net, m.init_from, sources.classes, logger)
    model = idist.auto_model(net, sync_bn=m.sync_bn)
    optimizer = idist.auto_optim(build_optimizer(model, cfg))
    scaler = None
    if needs_grad_scaler(device, cfg.amp, cfg.amp_dtype):
        scaler = torch.amp.GradScaler(device.type)

    labeled_targets = torch.as_tensor(sources.train.targets[data.labeled_indices])  # per-class counts: distribution alignment's target
    algorithm = build_algorithm(
        cfg.algorithm.name, cfg.algorithm.params, num_classes=sources.num_classes, num_unlabeled=len(data.unlabeled),
        labeled_counts=torch.bincount(labeled_targets, minlength=sources.num_classes).tolist(),
    ).to(device)
    if rank == 0:
        logger.info("Algorithm: %s", algorithm.describe())
    trainer = create_trainer(
        model, optimizer, device, algorithm,
        use_interleave=cfg.train.interleave, amp=cfg.amp, amp_dtype=cfg.amp_dtype,
        channels_last=m.channels_last, scaler=scaler, batch_transform=batch_transform,
        compile_model=compile_model, compile_mode=m.compile_mode,
        feedback=data.batched.feedback if isinstance(data.batched, CTAugmentViews) else None,
    )
    # Ignite logs the exception that ends a run (twice) before re-raising it; the command line prints it once.
    trainer.logger = setup_logger("trainer", level=logging.CRITICAL, distributed_rank=rank)
    attach_step_timer(trainer)
    attach_buffer_sync(trainer, model)
    stream, eval_loader = training_data(data, cfg, rank, world_size, device, start_iteration=lambda: trainer.state.iteration)

    to_save: dict[str, Any] = {
        "trainer": trainer,
        "model": getattr(model, "module", model),
        "optimizer": optimizer,
        "rng": RNGState(),
        "config": ConfigRecord(cfg),
        "classes": ClassesRecord(sources.classes, Preprocessing.from_sources(sources).to_dict()),
    }
    if scaler is not None:
        to_save["scaler"] = scaler
    if algorithm.has_state():  # its buffers: saved and restored like the model's
        to_save["algorithm"] = algorithm
    if isinstance(data.batched, CTAugmentViews):  # CTAugment's learned bin weights
        to_save["ctaugment"] = data.batched.policy
    ctx = Context(
        trainer=trainer, model=model, optimizer=optimizer, config=cfg, output_dir=output_dir, logger=logger,
        loaders={"train": stream, "test": eval_loader}, to_save=to_save, scaler=scaler, device=device,
        data=data, rank=rank, world_size=world_size,
    )
    attach_all(handlers, ctx)
    guard = PreemptionGuard(logger)
    guard.install()
    guard.attach(trainer, ctx.save_checkpoint, lambda: str(newest_checkpoint(output_dir) or "none (no checkpoint handler)"))

    if checkpoint is not None:
        load_into(to_save, checkpoint)
        logger.info("Resumed from %s at iteration %d", checkpoint, trainer.state.iteration)
        if resume_changes:  # allowed by resume_policy: they apply, and config.yaml and new checkpoints say so
            logger.info("resume: changed since the checkpoint: %s", describe_changes(resume_changes))
    elif cfg.resume == "auto":
        logger.info("resume=auto: no checkpoint in %s yet, starting a new run", output_dir / CHECKPOINT_DIR)

    trainer.run(stream, max_iters=cfg.train.num_iters, epoch_length=cfg.train.epoch_length)

    results_path = output_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if rank == 0 and results:
        logger.info("Finished: top-1 %.2f %%, top-5 %.2f %% (%s)", results["top1"], results["top5"], results_path)
    return results
