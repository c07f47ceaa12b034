"""Dynamic domain re-weighting: draw training examples by domain shares that follow the validation loss.

`WeightedDomainSampler` draws each training example in two steps: a domain (the record's `source`) by its
current share, then an example of that domain uniformly. It reads the shares from the `DomainWeights`
object every few draws, so an update takes effect within a batch or two, mid-epoch included.
`DomainReweightCallback` measures the mean token loss of the model on the validation split per domain
after every evaluation, passes the losses to `DomainWeights.update` (the rule lives in
`seektune.data.mix`) and keeps the history of shares for the report. `DomainSampledTrainer` is
transformers' `Trainer` with one change: the training sampler can be given.

Why our own: transformers' Trainer samples uniformly or by length, and torch's `WeightedRandomSampler`
fixes its weights per example when it is built; neither re-weights groups of examples while training.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback

from seektune.data.encode import IGNORE_INDEX
from seektune.data.records import column_values
from seektune.logs import log_event
from seektune.train.collate import REAL_TOKENS_KEY

if TYPE_CHECKING:
    from seektune.data.mix import DomainWeights

logger = logging.getLogger(__name__)


class WeightedDomainSampler(Sampler[int]):
    """`num_samples` example indices per epoch (default: one per example), drawn domain first by share."""

    def __init__(
        self,
        sources: Sequence[str] | pa.Array | pa.ChunkedArray,
        domain_weights: DomainWeights,
        seed: int,
        num_samples: int | None = None,
        refresh_every: int = 64,
    ) -> None:
        if len(sources) == 0:
            raise ValueError("WeightedDomainSampler needs at least one example")
        self.domains, codes = _encode(sources)
        self._members = np.argsort(codes, kind="stable")  # example indices grouped by domain
        self._sizes = np.bincount(codes, minlength=len(self.domains))
        self._starts = np.concatenate(([0], np.cumsum(self._sizes)[:-1]))
        self.domain_weights = domain_weights
        self.seed = seed
        self.epoch = 0
        self.num_samples = len(sources) if num_samples is None else num_samples
        self.refresh_every = refresh_every

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at the start of every epoch: epoch e draws with seed + e."""
        self.epoch = epoch

    def probabilities(self) -> np.ndarray:
        """The current shares of the domains that have training examples, normalised."""
        shares = self.domain_weights.shares
        weights = np.array([max(float(shares.get(domain, 0.0)), 0.0) for domain in self.domains])
        if weights.sum() <= 0:
            raise ValueError(f"no domain with training examples has a positive share: {shares}")
        return weights / weights.sum()

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seed + self.epoch)
        left = self.num_samples
        while left > 0:
            count = min(self.refresh_every, left)
            domains = rng.choice(len(self.domains), size=count, p=self.probabilities())
            offsets = (rng.random(count) * self._sizes[domains]).astype(np.int64)
            yield from self._members[self._starts[domains] + offsets].tolist()
            left -= count


class EpochSeededLengthGroupedSampler(Sampler[int]):
    """transformers' length-grouped order (`get_length_grouped_indices`), drawn with seed + epoch.

    The Trainer (through accelerate) calls `set_epoch` at the start of every epoch, so a run resumed in
    epoch e draws the order the uninterrupted run drew, whatever the global RNG has seen.
    """

    def __init__(self, batch_size: int, lengths: Sequence[int], seed: int) -> None:
        self.batch_size = batch_size
        self.lengths = list(lengths)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def _encode(sources: Sequence[str] | pa.Array | pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """(sorted domain names, each example's domain number), through Arrow's dictionary encoding."""
    column = sources if isinstance(sources, pa.Array | pa.ChunkedArray) else pa.array(sources, pa.string())
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(column)
    names = [str(name) for name in encoded.dictionary.to_pylist()]
    rank = np.empty(len(names), dtype=np.int64)
    rank[np.argsort(names, kind="stable")] = np.arange(len(names))
    return sorted(names), rank[encoded.indices.to_numpy(zero_copy_only=False)]


def domain_losses(model: Any, dataset: Any, collator: Any, batch_size: int) -> dict[str, float]:
    """Mean token loss of `model` on `dataset` per domain (`source` column), without gradients.

    Each batch holds examples of one domain, so the model's mean loss times the batch's learnt tokens is
    the batch's summed loss; the domain's mean is summed loss over learnt tokens.
    """
    by_domain: dict[str, list[int]] = defaultdict(list)
    for index, source in enumerate(column_values(dataset, "source")):
        by_domain[source].append(index)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses: dict[str, float] = {}
    try:
        with torch.no_grad():
            for domain, indices in sorted(by_domain.items()):
                total, tokens = 0.0, 0
                for start in range(0, len(indices), batch_size):
                    batch = collator(_rows(dataset, indices[start : start + batch_size]))
                    learnt = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                    if learnt:
                        output = model(**_to_device(batch, device))
                        total += float(output.loss) * learnt
                        tokens += learnt
                if tokens:
                    losses[domain] = total / tokens
    finally:
        model.train(was_training)
    return losses


class DomainReweightCallback(TrainerCallback):
    """After every evaluation: per-domain validation loss → `DomainWeights.update` → new shares."""

    def __init__(self, domain_weights: DomainWeights, eval_dataset: Any, collator: Any) -> None:
        self.domain_weights = domain_weights
        self.eval_dataset = eval_dataset
        self.collator = collator
        self.history: list[dict[str, Any]] = [
            {"step": 0, "losses": {}, "shares": _rounded(domain_weights.shares)}
        ]

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        losses = domain_losses(model, self.eval_dataset, self.collator, args.eval_batch_size)
        # A source with validation data but no training rows (e.g. `split: validation`) has nothing to draw.
        losses = {name: loss for name, loss in losses.items() if name in self.domain_weights.shares}
        shares = self.domain_weights.update(losses)
        entry = {"step": state.global_step, "losses": _rounded(losses), "shares": _rounded(shares)}
        self.history.append(entry)
        log_event(logger, "domain weights updated", **entry)


class DomainSampledTrainer(Trainer):
    """transformers' `Trainer` whose training sampler may be given (None: the Trainer's own choice)."""

    def __init__(self, *args: Any, train_sampler: Sampler[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_sampler = train_sampler

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler[int] | None:
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The model's inputs of a collated batch on `device` (without the collator's token count)."""
    return {
        key: value.to(device) if torch.is_tensor(value) else value
        for key, value in batch.items()
        if key != REAL_TOKENS_KEY
    }


def _rows(dataset: Any, indices: list[int]) -> list[dict[str, Any]]:
    columns = dataset[indices]
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(float(value), 4) for key, value in values.items()}


class TrainingHealthCallback(TrainerCallback):
    """Stops a run whose loss is no longer a number, and warns when the gradient norm spikes.

    A NaN or infinite loss stops training at once (the caller turns `stopped_at` into one clear error)
    instead of spending the rest of the budget on garbage weights. A gradient norm above `spike` times the
    running median of the norms so far is logged with its step: the usual first sign of a learning rate
    that is too high.
    """

    def __init__(self, spike: float = 100.0) -> None:
        self.spike = spike
        self.norms: list[float] = []
        self.stopped_at: int | None = None
        self.bad_loss: float | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            self.stopped_at, self.bad_loss = state.global_step, loss
            logger.error("loss is %s at step %d: stopping the run", loss, state.global_step)
            control.should_training_stop = True
            return
        norm = logs.get("grad_norm")
        if norm is None:
            return
        if self.norms and math.isfinite(norm):
            median = statistics.median(self.norms[-50:])
            if median > 0 and norm > self.spike * median:
                logger.warning(
                    "gradient norm spike at step %d: %.4g, %.0fx the running median %.4g; "
                    "consider a lower train.learning_rate",
                    state.global_step,
                    norm,
                    norm / median,
                    median,
                )
        if math.isfinite(norm):
            self.norms.append(norm)


class OptimizerStateCallback(TrainerCallback):
    """Loads a checkpoint's optimizer state when training starts (resuming onto new data).

    `Trainer.train(resume_from_checkpoint=...)` restores the optimizer together with the schedule, the RNG
    and the data position; with new data only the weights and the optimizer's moments carry over, so the
    optimizer state is loaded here, once the Trainer has built the optimizer.
    """

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = Path(checkpoint)

    def on_train_begin(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        path = self.checkpoint / "optimizer.pt"
        if optimizer is None or not path.is_file():
            logger.warning("no optimizer state in %s: the optimizer starts afresh", self.checkpoint)
            return
        optimizer.load_state_dict(torch.load(path, map_location=args.device, weights_only=True))
