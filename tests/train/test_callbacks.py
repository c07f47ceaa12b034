"""Dynamic domain re-weighting: the weighted domain sampler, per-domain losses, the callback, train()."""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tinymodels import EASY_TOKEN, VOCAB, domain_split, llama

from seektune.config import TrainConfig
from seektune.data.mix import DomainWeights
from seektune.data.pack import pack_dataset
from seektune.errors import UserError
from seektune.rundir import RunDir
from seektune.train.callbacks import (
    DomainReweightCallback,
    DomainSampledTrainer,
    WeightedDomainSampler,
    domain_losses,
)
from seektune.train.collate import PaddingCollator
from seektune.train.trainer import train

# ---------------------------------------------------------------------------------------------------------
# Sampler


def test_sampler_follows_the_shares_and_draws_uniformly_inside_a_domain():
    sources = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    weights = DomainWeights({"a": 0.2, "b": 0.3, "c": 0.5}, step=1.0, min_share=0.0)
    sampler = WeightedDomainSampler(sources, weights, seed=3, num_samples=20_000)
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 20_000
    by_domain = Counter(sources[i] for i in drawn)
    for domain, share in {"a": 0.2, "b": 0.3, "c": 0.5}.items():
        assert by_domain[domain] / 20_000 == pytest.approx(share, abs=0.015)
    per_example_c = Counter(i for i in drawn if sources[i] == "c")
    assert set(per_example_c) == set(range(80, 100))  # every example of c, nothing else labelled c
    assert max(per_example_c.values()) < 2 * min(per_example_c.values())  # about 500 each


def test_sampler_is_seeded_by_seed_and_epoch():
    sources = ["a", "b"] * 20
    weights = DomainWeights({"a": 0.5, "b": 0.5}, step=1.0, min_share=0.0)
    first = list(WeightedDomainSampler(sources, weights, seed=1))
    assert first == list(WeightedDomainSampler(sources, weights, seed=1))
    assert len(first) == 40  # one epoch: one draw per example
    sampler = WeightedDomainSampler(sources, weights, seed=1)
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(sampler) == list(WeightedDomainSampler(sources, weights, seed=2))  # seed + epoch


def test_sampler_reads_updated_shares_mid_epoch():
    sources = ["a"] * 10 + ["b"] * 10
    holder = SimpleNamespace(shares={"a": 1.0, "b": 0.0})
    iterator = iter(WeightedDomainSampler(sources, holder, seed=0, num_samples=512, refresh_every=64))
    head = [next(iterator) for _ in range(64)]
    holder.shares = {"a": 0.0, "b": 1.0}
    tail = list(iterator)
    assert all(i < 10 for i in head) and all(i >= 10 for i in tail)


# ---------------------------------------------------------------------------------------------------------
# Per-domain losses and the callback


def test_domain_losses_equal_the_token_mean_per_domain(tiny_llama, tokenizer):
    dataset = domain_split({"easy": 3, "hard": 5})
    losses = domain_losses(tiny_llama, dataset, PaddingCollator(tokenizer), batch_size=2)
    expected = {}
    with torch.no_grad():
        for domain in ("easy", "hard"):
            total, tokens = 0.0, 0
            for row in (row for row in dataset if row["source"] == domain):
                logits = tiny_llama(torch.tensor([row["input_ids"]])).logits[0, :-1]
                labels = torch.tensor(row["labels"][1:])
                total += float(F.cross_entropy(logits, labels, reduction="sum"))
                tokens += len(labels)
            expected[domain] = total / tokens
    assert losses == pytest.approx(expected, rel=1e-5)
    assert expected["hard"] != pytest.approx(expected["easy"], rel=1e-3)  # the grouping matters
    tiny_llama.train()
    domain_losses(tiny_llama, dataset, PaddingCollator(tokenizer), batch_size=4)
    assert tiny_llama.training  # the model's mode is restored


class _FavoursOneToken(torch.nn.Module):
    """A fake language model that always predicts EASY_TOKEN: low loss on 'easy', high on random tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(VOCAB))
        with torch.no_grad():
            self.bias[EASY_TOKEN] = 8.0

    def forward(self, input_ids, labels, attention_mask=None, **_):
        logits = self.bias.expand(*input_ids.shape, VOCAB)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return SimpleNamespace(loss=loss, logits=logits)


def test_callback_moves_weight_to_the_domain_with_higher_validation_loss(tokenizer, caplog):
    weights = DomainWeights({"easy": 0.5, "hard": 0.5}, step=1.0, min_share=0.05)
    validation = domain_split({"easy": 4, "hard": 4})
    callback = DomainReweightCallback(weights, validation, PaddingCollator(tokenizer))
    args = SimpleNamespace(eval_batch_size=3)
    with caplog.at_level(logging.INFO, logger="seektune"):
        callback.on_evaluate(args, SimpleNamespace(global_step=5), None, model=_FavoursOneToken())
    entry = callback.history[-1]
    assert entry["step"] == 5
    assert entry["losses"]["hard"] > 4 * entry["losses"]["easy"]
    assert weights.shares["hard"] > 0.6 and entry["shares"] == pytest.approx(weights.shares, abs=1e-4)
    assert callback.history[0] == {"step": 0, "losses": {}, "shares": {"easy": 0.5, "hard": 0.5}}
    assert any(record.getMessage() == "domain weights updated" for record in caplog.records)


# ---------------------------------------------------------------------------------------------------------
# Trainer integration


def test_trainer_draws_training_batches_from_the_given_sampler(tiny_llama, tokenizer, tmp_path):
    from transformers import TrainingArguments

    train_set = domain_split({"easy": 6, "hard": 6})
    only_easy = WeightedDomainSampler(
        train_set["source"], SimpleNamespace(shares={"easy": 1.0, "hard": 0.0}), seed=0
    )
    trainer = DomainSampledTrainer(
        model=tiny_llama,
        args=TrainingArguments(str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to="none"),
        train_dataset=train_set,
        data_collator=PaddingCollator(tokenizer),
        train_sampler=only_easy,
    )
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == 3
    learnt = torch.cat([batch["labels"][batch["labels"] != -100] for batch in batches])
    assert set(learnt.tolist()) == {EASY_TOKEN}


def test_train_with_domain_weights_records_the_shares(tokenizer, tmp_path):
    data = SimpleNamespace(  # what train() reads of PreparedData
        tokenized={
            "train": domain_split({"easy": 8, "hard": 8}),
            "validation": domain_split({"easy": 3, "hard": 3}, 1),
        },
        report={"train_tokens": 100},
    )
    cfg = TrainConfig(
        learning_rate=0.01, batch_size=4, max_steps=2, eval_steps=1, logging_steps=1, precision="fp32"
    )
    weights = DomainWeights({"easy": 0.5, "hard": 0.5}, step=1.0, min_share=0.05)
    run = RunDir.create(tmp_path, "t")
    result = train(cfg, llama(), tokenizer, data, run, seed=0, domain_weights=weights)
    assert [entry["step"] for entry in result.domain_shares] == [0, 1, 2]
    for before, after in zip(result.domain_shares, result.domain_shares[1:], strict=False):
        losses, gain = after["losses"], after["shares"]["hard"] - before["shares"]["hard"]
        assert (gain > 0) == (losses["hard"] > losses["easy"])  # the harder domain at that step gained
    assert len(weights.history) == 2  # the final evaluation after training does not update the shares
    assert result.summary()["domain_shares"] == result.domain_shares
    assert (run.path / "model" / "config.json").is_file()


def test_train_with_domain_weights_refuses_packed_rows_and_a_missing_validation_split(tokenizer, tmp_path):
    weights = DomainWeights({"easy": 0.5, "hard": 0.5}, step=1.0, min_share=0.05)
    examples = domain_split({"easy": 4, "hard": 4})
    cfg = TrainConfig(max_steps=1, precision="fp32")
    run = RunDir.create(tmp_path, "t")
    no_validation = SimpleNamespace(
        tokenized={"train": examples, "validation": []}, report={"train_tokens": 1}
    )
    with pytest.raises(UserError, match=r"set data\.validation_ratio above 0"):
        train(cfg, llama(), tokenizer, no_validation, run, seed=0, domain_weights=weights)
    packed = SimpleNamespace(
        tokenized={"train": pack_dataset(examples, 32)[0], "validation": examples}, report={"train_tokens": 1}
    )
    with pytest.raises(UserError, match=r"turn off data\.packing"):
        train(cfg, llama(), tokenizer, packed, run, seed=0, domain_weights=weights)
