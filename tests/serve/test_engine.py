"""The continuous-batching engine on tiny seeded models: batched greedy decoding equals one-by-one
`generate`, rows join and leave, sampling parameters, stop strings, cancellation, limits, several LoRA
adapters in one batch."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from seektune.config import ServeLimitsConfig
from seektune.serve.adapters import AdapterError, AdapterSet
from seektune.serve.engine import (
    Engine,
    QueueFull,
    RequestTooLarge,
    SamplingParams,
    _Detokenizer,
    _StopMatcher,
)
from train.tinymodels import PAD, bpe_tokenizer, deepseek_v3, llama, word_tokenizer

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _prompts(count: int, seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 20, (count,), generator=generator)
    return [torch.randint(10, 60, (int(n),), generator=generator).tolist() for n in lengths]


def _generate(model, prompt: list[int], max_new: int, **kwargs) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=PAD,
        **kwargs,
    )
    return out[0, len(prompt) :].tolist()


async def _collect(engine: Engine, prompt, params: SamplingParams, adapter=None, delay: float = 0.0):
    await asyncio.sleep(delay)
    handle = engine.submit(prompt, params, adapter)
    texts, ids, finish, logprobs = {}, {}, {}, {}
    async for delta in handle:
        texts[delta.index] = texts.get(delta.index, "") + delta.text
        ids.setdefault(delta.index, []).extend(delta.token_ids)
        logprobs.setdefault(delta.index, []).extend(delta.logprobs)
        if delta.finish_reason:
            finish[delta.index] = delta.finish_reason
    return {"text": texts, "ids": ids, "finish": finish, "logprobs": logprobs, "handle": handle}


def _run(engine: Engine, jobs):
    async def main():
        return await asyncio.gather(*jobs())

    return asyncio.run(main())


@pytest.fixture
def engine_for():
    engines = []

    def make(model, tokenizer=None, **limits) -> Engine:
        engine = Engine(model, tokenizer or word_tokenizer(), ServeLimitsConfig(**limits))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(timeout_s=5)


@pytest.mark.parametrize("build", [deepseek_v3, llama], ids=["deepseek_v3", "llama"])
def test_batched_greedy_equals_one_by_one_generate(build, engine_for) -> None:
    model = build().eval()
    prompts = _prompts(12)
    expected = [_generate(model, p, 16) for p in prompts]
    engine = engine_for(model, max_batch_size=8)
    sizes: list[int] = []
    engine.on_step = lambda rows, tokens: sizes.append(rows)
    # staggered arrivals: rows join a running batch and leave it at different steps
    results = _run(
        engine,
        lambda: [
            _collect(engine, p, SamplingParams(max_tokens=16, **GREEDY), delay=0.004 * i)
            for i, p in enumerate(prompts)
        ],
    )
    assert [r["ids"][0] for r in results] == expected
    assert max(sizes) > 1 and max(sizes) <= 8
    assert all(r["finish"][0] == "length" for r in results)
    assert engine.stats.running == 0 and engine.stats.kv_tokens == 0


def test_rows_of_different_lengths_leave_without_disturbing_the_others(engine_for) -> None:
    model = deepseek_v3().eval()
    prompts = _prompts(6, seed=5)
    budgets = [3, 17, 5, 11, 1, 8]
    expected = [_generate(model, p, n) for p, n in zip(prompts, budgets, strict=True)]
    engine = engine_for(model)
    results = _run(
        engine,
        lambda: [
            _collect(engine, p, SamplingParams(max_tokens=n, **GREEDY))
            for p, n in zip(prompts, budgets, strict=True)
        ],
    )
    assert [r["ids"][0] for r in results] == expected
    assert [r["handle"].completion_tokens for r in results] == budgets


def test_eos_stops_unless_ignored(engine_for) -> None:
    model = llama().eval()
    prompt = _prompts(1)[0]
    free = _generate(model, prompt, 12)
    eos = free[4]  # make the fifth generated token the end-of-sequence token
    tokenizer = word_tokenizer()
    tokenizer.eos_token = f"t{eos}"
    engine = engine_for(model, tokenizer)
    model.generation_config.eos_token_id = None
    stopped, ignored = _run(
        engine,
        lambda: [
            _collect(engine, prompt, SamplingParams(max_tokens=12, temperature=0)),
            _collect(engine, prompt, SamplingParams(max_tokens=12, **GREEDY)),
        ],
    )
    first = free.index(eos)
    assert stopped["ids"][0] == free[: first + 1] and stopped["finish"][0] == "stop"
    assert ignored["ids"][0] == free and ignored["finish"][0] == "length"


def test_stop_strings_cut_the_text_and_end_the_row(engine_for) -> None:
    model = llama().eval()
    prompt = _prompts(1)[0]
    engine = engine_for(model)
    (free,) = _run(engine, lambda: [_collect(engine, prompt, SamplingParams(max_tokens=10, **GREEDY))])
    full = free["text"][0]
    stop = " ".join(full.split()[4:6])
    (result,) = _run(
        engine,
        lambda: [_collect(engine, prompt, SamplingParams(max_tokens=10, stop=["never", stop], **GREEDY))],
    )
    assert result["finish"][0] == "stop"
    assert result["text"][0] == full[: full.index(stop)]
    assert len(result["ids"][0]) < 10


def test_seed_reproduces_and_choices_differ(engine_for) -> None:
    model = deepseek_v3().eval()
    engine = engine_for(model)
    prompt = _prompts(1)[0]
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=7, n=3, ignore_eos=True)
    first, second = _run(engine, lambda: [_collect(engine, prompt, params), _collect(engine, prompt, params)])
    assert first["ids"] == second["ids"]
    assert len(first["ids"]) == 3 and len({tuple(v) for v in first["ids"].values()}) > 1
    assert first["handle"].completion_tokens == 36


def test_tiny_top_p_is_greedy_and_logprobs_are_the_models(engine_for) -> None:
    model = llama().eval()
    prompt = _prompts(1)[0]
    engine = engine_for(model)
    params = SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-6, seed=1, logprobs=3, ignore_eos=True)
    (result,) = _run(engine, lambda: [_collect(engine, prompt, params)])
    ids = result["ids"][0]
    assert ids == _generate(model, prompt, 6)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    for step, entry in enumerate(result["logprobs"][0]):
        assert entry.token_id == ids[step]
        assert entry.logprob == pytest.approx(float(expected[step, ids[step]]), abs=1e-4)
        assert [t for t, _, _ in entry.top] == expected[step].topk(3).indices.tolist()


def test_echo_gives_the_prompt_logprobs(engine_for) -> None:
    model = llama().eval()
    prompt = _prompts(1)[0]
    engine = engine_for(model)
    (result,) = _run(
        engine,
        lambda: [_collect(engine, prompt, SamplingParams(max_tokens=0, echo_logprobs=True, logprobs=0))],
    )
    handle = result["handle"]
    assert handle.completion_tokens == 0 and result["ids"][0] == [] and result["finish"][0] == "length"
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    assert handle.prompt_logprobs[0] is None
    got = [entry.logprob for entry in handle.prompt_logprobs[1:]]
    assert got == pytest.approx([float(logprobs[i - 1, prompt[i]]) for i in range(1, len(prompt))], abs=1e-4)


def test_presence_penalty_stops_repeats(engine_for) -> None:
    model = llama().eval()
    engine = engine_for(model)
    prompt = _prompts(1)[0]
    plain, penalised = _run(
        engine,
        lambda: [
            _collect(engine, prompt, SamplingParams(max_tokens=30, **GREEDY)),
            _collect(engine, prompt, SamplingParams(max_tokens=30, presence_penalty=100.0, **GREEDY)),
        ],
    )
    assert len(set(plain["ids"][0])) < 30  # a tiny random model repeats itself
    assert len(set(penalised["ids"][0])) == 30


def test_cancel_frees_the_rows(engine_for) -> None:
    model = deepseek_v3().eval()
    engine = engine_for(model)
    prompt = _prompts(1)[0]

    async def main():
        handle = engine.submit(prompt, SamplingParams(max_tokens=10_000, **GREEDY))
        keep = asyncio.create_task(_collect(engine, prompt, SamplingParams(max_tokens=40, **GREEDY)))
        seen = 0
        async for delta in handle:
            seen += len(delta.token_ids)
            if seen == 3:
                handle.cancel()
            if delta.finish_reason:
                assert delta.finish_reason == "abort"
        return seen, await keep

    seen, kept = asyncio.run(main())
    assert 3 <= seen < 40
    assert kept["ids"][0] == _generate(model, prompt, 40)
    deadline = time.monotonic() + 5
    while engine.stats.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats.running == 0 and engine.stats.kv_tokens == 0 and engine.stats.kv_reserved == 0


def test_queue_and_budget_limits() -> None:
    model = llama().eval()
    engine = Engine(
        model, word_tokenizer(), ServeLimitsConfig(max_queue=2, max_batch_tokens=40)
    )  # not started

    async def main():
        with pytest.raises(RequestTooLarge, match="budget of 40"):
            engine.submit(list(range(10, 30)), SamplingParams(max_tokens=30))
        engine.submit([10, 11], SamplingParams(max_tokens=4))
        engine.submit([10, 11], SamplingParams(max_tokens=4))
        with pytest.raises(QueueFull) as full:
            engine.submit([10, 11], SamplingParams(max_tokens=4))
        assert full.value.retry_after_s >= 1
        engine.drain()
        with pytest.raises(QueueFull, match="shutting down"):
            engine.submit([10], SamplingParams(max_tokens=1))

    asyncio.run(main())


def test_a_full_kv_budget_makes_requests_wait_not_fail(engine_for) -> None:
    model = llama().eval()
    engine = engine_for(model, max_batch_tokens=60)
    prompts = _prompts(5, seed=9)
    prompts = [p[:8] for p in prompts]
    running: list[int] = []
    engine.on_step = lambda rows, tokens: running.append(engine.stats.kv_reserved)
    results = _run(
        engine, lambda: [_collect(engine, p, SamplingParams(max_tokens=20, **GREEDY)) for p in prompts]
    )
    assert [r["ids"][0] for r in results] == [_generate(model, p, 20) for p in prompts]
    assert max(running) <= 60


def test_detokenizer_never_emits_half_a_character() -> None:
    tokenizer = bpe_tokenizer()
    text = "深度求索 seektune 你好"
    ids = tokenizer(text)["input_ids"]
    detok = _Detokenizer(tokenizer, [])
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_detokenizer_flushes_a_cut_character_and_bounds_what_it_holds() -> None:
    tokenizer = bpe_tokenizer()
    ids = tokenizer("你")["input_ids"]
    assert len(ids) > 1  # byte-level: one character, several tokens
    detok = _Detokenizer(tokenizer, [])
    assert detok.add(ids[0]) == ""  # half a character is held back ...
    assert detok.flush() == "\ufffd"  # ... and given (as U+FFFD) when the sequence ends at its length
    stuck = _Detokenizer(tokenizer, [])
    pieces = [stuck.add(ids[0]) for _ in range(_Detokenizer.MAX_HELD + 2)]
    assert any(pieces) and pieces[0] == ""  # a run of bytes that never completes is not held for ever


def test_stop_matcher_holds_back_a_possible_stop() -> None:
    matcher = _StopMatcher(["</end>"])
    assert matcher.feed("hello </") == ("hello ", False)
    assert matcher.feed("en") == ("", False)
    assert matcher.feed("d> more") == ("", True)
    assert matcher.text == "hello "
    other = _StopMatcher(["</end>"])
    assert other.feed("a </") == ("a ", False)
    assert other.feed("x") == ("</x", False)
    assert other.flush() == ""


# ----- several adapters on one base


def _lora(base, seed: int, folder: Path) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a visible delta
    model.save_pretrained(folder)
    return folder


def test_several_adapters_share_one_batch(tmp_path: Path, engine_for) -> None:
    a = _lora(llama(), 1, tmp_path / "a")
    b = _lora(llama(), 2, tmp_path / "b")
    prompts = _prompts(6, seed=4)
    expected = {}
    for name, folder in (("a", a), ("b", b)):
        tuned = PeftModel.from_pretrained(llama(), str(folder)).eval()
        expected[name] = [_generate(tuned, p, 10) for p in prompts]
    expected[None] = [_generate(llama().eval(), p, 10) for p in prompts]
    assert expected["a"] != expected[None] and expected["a"] != expected["b"]

    base = llama().eval()
    engine = engine_for(base)
    adapters = AdapterSet(engine, "base", adapter_dir=tmp_path)
    adapters.load("a", a)
    adapters.load("b", "b", from_admin=True)
    assert adapters.names == ["a", "b"]
    sizes: list[int] = []
    engine.on_step = lambda rows, tokens: sizes.append(rows)
    jobs = [(name, i) for i in range(len(prompts)) for name in ("a", "b", None)]
    results = _run(
        engine,
        lambda: [
            _collect(engine, prompts[i], SamplingParams(max_tokens=10, **GREEDY), name) for name, i in jobs
        ],
    )
    for (name, i), result in zip(jobs, results, strict=True):
        assert result["ids"][0] == expected[name][i], (name, i)
        assert result["handle"].version == (name or "base")
    assert max(sizes) > 3  # rows of the three models decoded together
    adapters.unload("b")
    assert adapters.names == ["a"]


def test_adapter_refusals(tmp_path: Path, engine_for) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = _lora(llama(), 1, tmp_path / "outside")
    (allowed / "escape").symlink_to(outside)
    other = _lora(llama(hidden_size=48, intermediate_size=96), 3, allowed / "wide")
    engine = engine_for(llama().eval())
    adapters = AdapterSet(engine, "base", adapter_dir=allowed)
    with pytest.raises(AdapterError, match="outside the allowed") as refused:
        adapters.load("x", outside, from_admin=True)
    assert refused.value.status == 403
    with pytest.raises(AdapterError, match="outside the allowed"):
        adapters.load("x", "escape", from_admin=True)
    with pytest.raises(AdapterError, match="does not exist"):
        adapters.load("x", "missing", from_admin=True)
    with pytest.raises(AdapterError, match="does not fit"):
        adapters.load("x", other, from_admin=True)
    with pytest.raises(AdapterError, match="not allowed"):
        adapters.load("../x", outside)
    with pytest.raises(AdapterError, match="already served"):
        adapters.load("base", outside)
    with pytest.raises(AdapterError) as unknown:
        adapters.unload("nope")
    assert unknown.value.status == 404
    off = AdapterSet(engine, "base")
    with pytest.raises(AdapterError, match="at run time is off"):
        off.load("x", outside, from_admin=True)
    # a failed load leaves the engine serving the base as before
    adapters.load("ok", outside)
    prompt = _prompts(1)[0]
    (result,) = _run(engine, lambda: [_collect(engine, prompt, SamplingParams(max_tokens=5, **GREEDY))])
    assert result["ids"][0] == _generate(llama().eval(), prompt, 5)
