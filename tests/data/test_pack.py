"""Packing: first-fit bins (shuffled, decreasing), packed rows, the packed collator, loss parity."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig

from seektune.data.pack import pack_dataset, pack_lengths
from seektune.train.collate import PackedCollator, PaddingCollator

VOCAB = 128
PAD = 7


def _naive_first_fit(lengths: list[int], capacity: int, order: list[int]) -> list[list[int]]:
    bins: list[list[int]] = []
    free: list[int] = []
    for index in order:
        slot = next((b for b, room in enumerate(free) if room >= lengths[index]), len(bins))
        if slot == len(bins):
            bins.append([])
            free.append(capacity)
        bins[slot].append(index)
        free[slot] -= lengths[index]
    return bins


def test_pack_lengths_is_first_fit_decreasing_on_a_hand_example():
    # Sorted: 8, 5, 4, 3, 1. 8 opens bin 0 (2 left), 5 opens bin 1, 4 joins bin 1 (1 left), 3 opens bin 2,
    # and 1 goes to the FIRST bin with room, bin 0 (best fit would have chosen bin 1, with exactly 1 left).
    assert pack_lengths([5, 3, 8, 1, 4], 10, order="decreasing") == [[2, 3], [0, 4], [1]]


def test_pack_lengths_properties_on_random_lengths():
    rng = random.Random(0)
    for _ in range(30):
        capacity = rng.randint(8, 64)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 200))]
        bins = pack_lengths(lengths, capacity, order="decreasing")
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every index exactly once
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        assert bins == _naive_first_fit(
            lengths, capacity, sorted(range(len(lengths)), key=lambda i: -lengths[i])
        )
        assert pack_lengths(lengths, capacity, order="decreasing") == bins  # deterministic


def test_shuffled_packing_is_first_fit_over_a_seeded_permutation():
    rng = random.Random(1)
    for seed in range(20):
        capacity = rng.randint(8, 64)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 200))]
        bins = pack_lengths(lengths, capacity, seed=seed)  # shuffled is the default
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        permutation = np.random.default_rng(seed).permutation(len(lengths)).tolist()
        assert bins == _naive_first_fit(lengths, capacity, permutation)
        assert pack_lengths(lengths, capacity, seed=seed) == bins
    assert pack_lengths(list(range(1, 40)), 50, seed=0) != pack_lengths(list(range(1, 40)), 50, seed=1)


def test_shuffled_rows_mix_lengths_where_decreasing_rows_sort_them():
    """Why shuffled is the default: first-fit decreasing makes rows of look-alike examples."""
    lengths = [100] * 50 + [10] * 500  # 50 long and 500 short examples, rows of 200
    rows = {order: pack_lengths(lengths, 200, order=order) for order in ("decreasing", "shuffled")}
    mixed = {order: sum(len({lengths[i] for i in row}) > 1 for row in bins) for order, bins in rows.items()}
    assert mixed["decreasing"] == 0  # rows of two long examples, then rows of twenty short ones
    assert mixed["shuffled"] > len(rows["shuffled"]) // 2
    assert len(rows["shuffled"]) == len(rows["decreasing"]) == 50  # still full rows here


def test_pack_lengths_refuses_an_unknown_order():
    with pytest.raises(ValueError, match="order must be one of shuffled, decreasing, got 'longest'"):
        pack_lengths([3, 2], 8, order="longest")


def test_pack_lengths_refuses_an_example_over_the_budget():
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than pack_length=8"):
        pack_lengths([3, 9, 2], 8)
    assert pack_lengths([], 8) == []


def _examples(lengths: list[int], seed: int = 0) -> Dataset:
    """Tokenised examples: random ids; labels -100 on the first token and on a 'prompt' of 2 tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "length": [], "source": []}
    for number, size in enumerate(lengths):
        ids = torch.randint(8, VOCAB, (size,), generator=generator).tolist()
        rows["input_ids"].append(ids)
        rows["labels"].append([-100, -100, *ids[2:]])
        rows["length"].append(size)
        rows["source"].append("code" if number % 2 else "chat")
    return Dataset.from_dict(rows)


def test_pack_dataset_rows_restart_positions_and_mask_first_labels():
    examples = _examples([5, 3, 6, 2, 4])
    packed, stats = pack_dataset(examples, 8, order="decreasing")
    assert packed.column_names == ["input_ids", "labels", "position_ids", "length"]
    # FFD over [5, 3, 6, 2, 4] in 8: [6, 2], [5, 3], [4].
    assert packed["length"] == [8, 8, 4]
    assert packed[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert packed[1]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2]
    source = examples[2]["input_ids"] + examples[3]["input_ids"]
    assert packed[0]["input_ids"] == source
    labels = packed[1]["labels"]
    assert labels[0] == labels[5] == -100  # the first token of each packed example is never a target
    assert labels[2:5] == examples[0]["input_ids"][2:5]
    # Example 3 (2 tokens, labels [-100, -100]) and example 2: no label learnt at either start.
    assert packed[0]["labels"][6:] == [-100, -100]
    assert (
        stats["examples"] == 5
        and stats["rows"] == 3
        and stats["tokens"] == 20
        and stats["order"] == "decreasing"
    )
    assert stats["fill"] == pytest.approx(20 / 24, abs=1e-4)
    # One batch of 8: unpacked pads 5 examples to 6 (30 - 20 = 10), packed pads 3 rows to 8 (24 - 20 = 4).
    assert stats["padding_saved"] == stats["padding_saved_shuffled"] == 6


def test_pack_dataset_forces_a_boundary_label_even_when_the_example_learns_its_first_token():
    examples = Dataset.from_dict({"input_ids": [[10, 11, 12], [20, 21]], "labels": [[10, 11, 12], [20, 21]]})
    packed, _ = pack_dataset(examples, 5, order="decreasing")
    assert packed[0]["labels"] == [-100, 11, 12, -100, 21]
    assert packed[0]["length"] == 5  # lengths were computed from input_ids (no `length` column)


def test_pack_dataset_of_an_empty_split():
    packed, stats = pack_dataset(_examples([]), 8)
    assert len(packed) == 0 and stats["rows"] == 0 and stats["fill"] == 0.0


def test_packed_collator_pads_rows_as_a_separate_sequence_without_attention_mask():
    rows = [
        {"input_ids": [11, 12, 13, 14], "labels": [-100, 12, -100, 14], "position_ids": [0, 1, 0, 1]},
        {"input_ids": [21, 22], "labels": [-100, 22], "position_ids": [0, 1], "length": 2, "source": "x"},
    ]
    batch = PackedCollator(pad_token_id=PAD)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache", "num_real_tokens"}
    assert batch["use_cache"] is False
    assert batch["num_real_tokens"] == 6  # the two padding positions are not counted
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14], [21, 22, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 12, -100, 14], [-100, 22, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert batch["input_ids"].dtype == torch.long


def test_padding_collator_drops_extra_columns_and_pads_labels(tiny_pad_tokenizer):
    features = [
        {"input_ids": [11, 12, 13], "labels": [-100, 12, 13], "length": 3, "source": "chat"},
        {"input_ids": [21], "labels": [-100], "length": 1, "source": "code"},
    ]
    batch = PaddingCollator(tiny_pad_tokenizer)(features)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "num_real_tokens"}
    assert batch["num_real_tokens"] == 4
    assert batch["input_ids"].tolist() == [[11, 12, 13], [21, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 12, 13], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.fixture(scope="module")
def tiny_pad_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=f"t{PAD}", eos_token="t2")


# ---------------------------------------------------------------------------------------------------------
# Loss parity: a packed row gives the same summed token loss as its examples one by one.

_IDS = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD}
# initializer_range 0.2 (default 0.02) makes attention sharp enough that a leak across examples shows.
_SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,  # DeepseekV3Config defaults to 128 whatever the heads: eager would break
    "initializer_range": 0.2,
}
CONFIGS = {
    "deepseek_v3": lambda: DeepseekV3Config(
        **_IDS,
        **_SMALL,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        q_lora_rank=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        max_position_embeddings=64,
    ),
    "llama": lambda: LlamaConfig(**_IDS, **_SMALL, max_position_embeddings=64),
}
LENGTHS = [7, 5, 9, 4]


def _model(family: str, attention: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation=attention)
    return model.float().eval()  # config.use_cache stays True: the collator must switch the cache off


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over learnt labels (the model's shift: logits[t] predicts t + 1)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
    )


def _one_by_one(model, examples: Dataset) -> float:
    total = 0.0
    for example in examples:  # default forward: use_cache from the config (True), as a user would call it
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
        total += float(_summed_loss(model(input_ids=ids).logits, labels))
    return total


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["deepseek_v3", "llama"])
def test_packed_loss_equals_unpacked_loss(family: str, attention: str):
    model = _model(family, attention)
    examples = _examples(LENGTHS, seed=1)
    with torch.no_grad():
        reference = _one_by_one(model, examples)
        one_row, _ = pack_dataset(examples, sum(LENGTHS), order="decreasing")
        assert len(one_row) == 1
        packed = _packed_loss(model, one_row)
        # Two rows of different lengths: the shorter is padded, and its padding must not leak either.
        two_rows, _ = pack_dataset(examples, 13, order="decreasing")
        assert len(two_rows) == 2 and len(set(two_rows["length"])) == 2
        padded = _packed_loss(model, two_rows)
        # Plain concatenation (positions 0..n-1 across examples): each example attends to the earlier ones.
        ids, labels = torch.tensor(one_row["input_ids"]), torch.tensor(one_row["labels"])
        concatenated = float(_summed_loss(model(input_ids=ids, use_cache=False).logits, labels))
        # Restarting positions but a key-value cache (the config default): transformers skips the packed mask.
        positions = torch.tensor(one_row["position_ids"])
        cached = float(_summed_loss(model(input_ids=ids, position_ids=positions).logits, labels))
    assert packed == pytest.approx(reference, rel=1e-4)
    assert padded == pytest.approx(reference, rel=1e-4)
    assert abs(concatenated - reference) > 1e-2 * reference  # about 4% on these models
    assert abs(cached - reference) > 1e-2 * reference


def _packed_loss(model, rows: Dataset) -> float:
    batch = PackedCollator(PAD)(list(rows))
    del batch["num_real_tokens"]
    return float(_summed_loss(model(**batch).logits, batch["labels"]))
