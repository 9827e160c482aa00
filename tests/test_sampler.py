"""`SamplerChain` with a grammar on the real Qwen model: the grammar is applied lazily
(the pick is checked, and only a rejected pick is made again among the allowed tokens),
which must give the tokens a grammar applied to every candidate gives."""

from __future__ import annotations

import re

import llama_cpp
import numpy as np

from kvchat import Engine, SamplingParams
from kvchat.llama import Batch, Context, ContextParams, Model, SamplerChain, json_schema_to_grammar

PROMPT = "<|im_start|>user\nHow many apples are in the basket? Reply in JSON.<|im_end|>\n<|im_start|>assistant\n"
# The model's own first choice is text, not this shape: the grammar must reject picks.
GRAMMAR = json_schema_to_grammar({
    "type": "object",
    "properties": {"fruit_count": {"type": "integer"}, "colour_of_basket": {"type": "string", "maxLength": 12}},
    "required": ["fruit_count", "colour_of_basket"],
})


def greedy_chain(model: Model, grammar: str) -> SamplerChain:
    return SamplerChain(model, temperature=0, top_k=0, top_p=1, min_p=0, repeat_penalty=1, presence_penalty=0,
                        frequency_penalty=0, penalty_last_n=0, logit_bias={}, seed=0, grammar=grammar)


def grammar_on_every_token(model: Model, grammar: str) -> llama_cpp.llama_sampler_p:
    """The reference: llama.cpp's chain of grammar then greedy, checking every token."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(
        chain, llama_cpp.llama_sampler_init_grammar(model.vocab_handle, grammar.encode(), b"root"))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    return chain


def test_lazy_grammar_picks_what_checking_every_token_picks_and_rejects_some_picks(qwen_model: Model) -> None:
    tokens = qwen_model.tokenize(PROMPT, parse_special=True)
    reference = grammar_on_every_token(qwen_model, GRAMMAR)
    rejected = 0
    with Context(qwen_model, ContextParams(n_ctx=1024)) as ctx, Batch(512) as batch, \
            greedy_chain(qwen_model, GRAMMAR) as lazy:
        batch.add_chunk(tokens, 0, 0, logits_last=True)
        ctx.decode(batch)
        generated: list[int] = []
        for position in range(len(tokens), len(tokens) + 40):
            unconstrained = int(np.argmax(ctx.logits(-1)))
            expected = int(llama_cpp.llama_sampler_sample(reference, ctx.handle, -1))
            picked = lazy.sample(ctx, -1)
            assert picked == expected, (len(generated), picked, expected)
            rejected += picked != unconstrained
            generated.append(picked)
            if qwen_model.is_end_of_generation(picked):
                break
            batch.clear()
            batch.add(picked, position, 0, logits=True)
            ctx.decode(batch)
    llama_cpp.llama_sampler_free(reference)
    text = qwen_model.detokenize(generated)
    assert re.fullmatch(r'\{\s*"fruit_count"\s*:\s*-?\d+\s*,\s*"colour_of_basket"\s*:\s*"[^"]*"\s*\}\s*', text), text
    assert rejected > 0  # the grammar overruled the model's own pick at least once


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
