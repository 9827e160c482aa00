"""One shared prompt, forked into 4 branches that are decoded together.

The fork shares the prompt's KV cells (no copy); each branch then adds its own
line and the engine decodes all four in one batch per step.

    python examples/conversation_fork.py
"""

from kvchat import Engine, SamplingParams, models

STARTS = [" The dragon", " The robot", " The sailor", " The gardener"]

with Engine(models.resolve("gemma-3-270m")) as engine:
    root = engine.conversation()
    root.prompt("Four very short stories, each one sentence long, all set in the same old lighthouse.\n")
    root.generate(SamplingParams(temperature=0, max_tokens=1)).collect()  # evaluate the shared prompt once
    print(f"shared prompt: {len(root.tokens)} tokens resident")
    branches = [root.fork() for _ in STARTS]
    print(f"after 4 forks: {engine.stats().tokens_resident} tokens resident (nothing was copied)")
    for branch, start in zip(branches, STARTS):
        branch.prompt(start)
    streams = [b.generate(SamplingParams(temperature=0.7, seed=i, max_tokens=30)) for i, b in enumerate(branches)]
    for start, stream in zip(STARTS, streams):  # the four were decoded together
        done = stream.collect()
        print(f"\n{start.strip()}{done.text}\n  [evaluated {done.usage.evaluated_tokens} new tokens, "
              f"{done.usage.cached_tokens} shared]")
    for branch in branches:
        branch.close()
    root.close()
