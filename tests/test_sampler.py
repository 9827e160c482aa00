"""Sampling under a grammar on the real Qwen model. The engine applies the grammar lazily
(the pick is checked, and only a refused pick is made again among the allowed tokens);
that must give the tokens that masking every step gives, and random draws must follow
the grammar. `SamplerChain.choose` picks among finite logits only."""

from __future__ import annotations

import re

import numpy as np

from kvchat import Engine, Grammar, SamplingParams
from kvchat.llama import Batch, Context, ContextParams, Model, SamplerChain

PROMPT = "<|im_start|>user\nHow many apples are in the basket? Reply in JSON.<|im_end|>\n<|im_start|>assistant\n"
# The model's own first choice is text, not this shape: the grammar must refuse picks.
SCHEMA = {
    "type": "object",
    "properties": {"fruit_count": {"type": "integer", "minimum": 0, "maximum": 1000},
                   "colour_of_basket": {"type": "string", "maxLength": 12}},
    "required": ["fruit_count", "colour_of_basket"],
}


def chain(model: Model, *, temperature: float, seed: int = 0) -> SamplerChain:
    return SamplerChain(model, temperature=temperature, top_k=0, top_p=1, min_p=0, repeat_penalty=1,
                        presence_penalty=0, frequency_penalty=0, penalty_last_n=0, logit_bias={}, seed=seed)


def masked_every_step(model: Model, prompt: list[int], grammar: Grammar, max_tokens: int) -> tuple[list[int], int]:
    """The reference: greedy decoding with the grammar's whole mask applied at every step.
    Returns the tokens and how many steps the mask changed the unconstrained pick."""
    matcher = grammar.matcher(model)
    overruled = 0
    generated: list[int] = []
    with Context(model, ContextParams(n_ctx=1024)) as ctx, Batch(512) as batch:
        batch.add_chunk(prompt, 0, 0, logits_last=True)
        ctx.decode(batch)
        for position in range(len(prompt), len(prompt) + max_tokens):
            logits = ctx.logits(-1)
            picked = int(np.argmax(matcher.restrict(logits)))
            overruled += picked != int(np.argmax(logits))
            if model.is_end_of_generation(picked):
                break
            matcher.accept(picked)
            generated.append(picked)
            if matcher.complete:
                break
            batch.clear()
            batch.add(picked, position, 0, logits=True)
            ctx.decode(batch)
    return generated, overruled


def test_lazy_grammar_gives_what_masking_every_step_gives(qwen_model: Model) -> None:
    prompt = qwen_model.tokenize(PROMPT, parse_special=True)
    grammar = Grammar.json_schema(SCHEMA)
    expected, overruled = masked_every_step(qwen_model, prompt, grammar, 40)
    with Engine(qwen_model) as engine:  # its own engine: no cache, no drafts from earlier runs
        completion = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=40, grammar=grammar)).collect()
    assert list(completion.token_ids) == expected
    assert re.fullmatch(r'\{"fruit_count": \d+, "colour_of_basket": "[^"]*"\}', completion.text), completion.text
    assert completion.usage.finish_reason == "stop"
    assert overruled > 0  # the grammar overruled the model's own pick at least once
    assert completion.usage.forced_tokens > 0  # `{"fruit_count": ` and the second key were forced


def test_random_draws_under_a_grammar_always_follow_it(qwen_engine: Engine) -> None:
    prompt = qwen_engine.model.tokenize(PROMPT, parse_special=True)
    grammar = r'root ::= "Basket " [A-Z] ": " [0-9] [0-9]? " apples"'
    streams = [
        qwen_engine.submit(prompt, SamplingParams(temperature=1.5, top_k=0, top_p=1, min_p=0, max_tokens=16,
                                                  seed=seed, grammar=grammar))
        for seed in range(12)
    ]
    outputs = [stream.collect() for stream in streams]
    for output in outputs:
        assert re.fullmatch(r"Basket [A-Z]: \d\d? apples", output.text), output.text
        assert output.usage.finish_reason == "stop"
    assert len({output.text for output in outputs}) > 1  # the draws differ: sampling, not greedy


def test_choose_picks_only_among_finite_logits(qwen_model: Model) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=qwen_model.n_vocab).astype(np.float32)
    allowed = np.full(qwen_model.n_vocab, -np.inf, dtype=np.float32)
    allowed[[7, 70, 700]] = logits[[7, 70, 700]]
    with chain(qwen_model, temperature=0) as greedy, chain(qwen_model, temperature=2.0, seed=3) as hot:
        assert greedy.choose(logits) == int(np.argmax(logits))
        assert greedy.choose(allowed) == int(np.argmax(allowed))
        picks = {hot.choose(allowed) for _ in range(60)}
    assert picks <= {7, 70, 700} and len(picks) > 1
