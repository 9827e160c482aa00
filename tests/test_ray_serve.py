"""kvchat on Ray Serve for real: a local Ray instance on loopback, two Gemma
replicas behind the prefix-affinity router, the official `openai` client.

One application serves the whole module. Its replicas take 2 requests each
(`max_running` 2, `max_queued` 0, one tenant may use all of it) and the handle
in front of them queues 2 more, so a few long streams fill it. The tests that
need both replicas come before the ones that kill one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from http_server import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from kvchat.engine import EngineSettings  # noqa: E402
from kvchat.server import ServerSettings  # noqa: E402
from kvchat.server.ray_serve.app import build_app  # noqa: E402

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

MODEL = "gemma-3-270m"
KEYS = ("key-one", "key-two")
PLACES_PER_REPLICA = 2
HANDLE_QUEUE = 2
# Gemma 3's end tokens (<eos>, <end_of_turn>) banned: generation runs to max_tokens.
NO_END = {"1": -100, "106": -100}


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The application on 2 replicas; yields its base URL."""
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            MODEL,
            server_settings=ServerSettings(model_name=MODEL, api_keys=KEYS, max_queued=0, key_share=1.0),
            engine_settings=EngineSettings(n_ctx=4096, max_running=PLACES_PER_REPLICA, n_seq_max=8, n_threads=1),
            num_replicas=2,
            max_queued_requests=HANDLE_QUEUE,
        )
        serve.run(app, name="kvchat", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait_for_replicas(url, 2)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_for_replicas(url: str, count: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{url}/health")
        health = response.json()
        if response.status_code == 200 and health["replicas_running"] >= count:
            return health
        assert time.monotonic() < deadline, f"replicas did not report in time: {health}"
        time.sleep(0.5)


def _turn(client: openai.OpenAI, messages: list[dict], text: str) -> tuple[str, int, int]:
    """One turn with the whole history; the replica that served it, prompt and cached tokens."""
    messages.append({"role": "user", "content": text})
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    completion = raw.parse()
    messages.append({"role": "assistant", "content": completion.choices[0].message.content or ""})
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    return raw.headers["x-kvchat-replica"], usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0


def _kill(replica: str) -> None:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if replica in actor["name"] and "kvchat-replica" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError(f"no actor for replica {replica}")


def test_every_stored_response_is_reached_by_get_and_delete(cluster: str) -> None:
    _wait_for_replicas(cluster, 2)
    client = openai.OpenAI(base_url=f"{cluster}/v1", api_key=KEYS[0], max_retries=0)
    created: dict[str, str] = {}
    for index in range(10):
        raw = client.responses.with_raw_response.create(
            model=MODEL, input=f"Say the number {index}.", max_output_tokens=4
        )
        created[raw.parse().id] = raw.headers["x-kvchat-replica"]
    assert len(set(created.values())) == 2, created  # stored on both replicas
    for response_id, replica in created.items():
        raw = client.responses.with_raw_response.retrieve(response_id)
        assert raw.parse().id == response_id and raw.headers["x-kvchat-replica"] == replica
    for response_id, replica in created.items():
        deleted = httpx.delete(f"{cluster}/v1/responses/{response_id}", headers={"authorization": f"Bearer {KEYS[0]}"})
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert deleted.headers["x-kvchat-replica"] == replica
    for response_id in created:
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(response_id)


def test_a_bad_key_or_a_foreign_host_is_refused_before_the_body_is_read(cluster: str) -> None:
    url = f"{cluster}/v1/chat/completions"
    not_json = b"{this is not JSON"
    json_type = {"content-type": "application/json"}
    for headers in ({}, {"authorization": "Bearer wrong-key"}, {"authorization": f"Basic {KEYS[0]}"}):
        refused = httpx.post(url, content=not_json, headers={**json_type, **headers})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert "x-kvchat-replica" not in refused.headers  # the ingress answered, no replica saw it
    # A body past the size limit is not read either: the key is what is wrong with it.
    huge = httpx.post(url, content=b"x" * (5 * 1024 * 1024), headers={**json_type, "authorization": "Bearer wrong"})
    assert huge.status_code == 401
    good = {**json_type, "authorization": f"Bearer {KEYS[0]}"}
    foreign = httpx.post(url, content=not_json, headers={**good, "host": "rebound.example:8000"})
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "host_not_allowed"
    assert "x-kvchat-replica" not in foreign.headers
    assert httpx.get(f"{cluster}/health", headers={"host": "rebound.example"}).status_code == 403
    # With a good key and Host the same body reaches a replica, which finds it is not JSON.
    parsed = httpx.post(url, content=not_json, headers=good)
    assert parsed.status_code == 400 and "x-kvchat-replica" in parsed.headers


def test_past_the_handles_queue_a_request_gets_429_at_once(cluster: str) -> None:
    _wait_for_replicas(cluster, 2)
    headers = {"authorization": f"Bearer {KEYS[0]}"}

    def body(text: str, **options: object) -> dict[str, object]:
        return {"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0, **options}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=cluster, headers=headers, timeout=120) as client:
            async with contextlib.AsyncExitStack() as streams:
                # Every place on both replicas: streams that run to max_tokens, each admitted
                # (its first chunk arrived) before the next is sent.
                for index in range(2 * PLACES_PER_REPLICA):
                    long = body(f"Write a long story number {index}.", max_tokens=1500, logit_bias=NO_END, stream=True)
                    response = await streams.enter_async_context(
                        client.stream("POST", "/v1/chat/completions", json=long)
                    )
                    assert response.status_code == 200
                waiting = [
                    asyncio.create_task(client.post("/v1/chat/completions", json=body(f"Say {index}.", max_tokens=2)))
                    for index in range(HANDLE_QUEUE)
                ]
                await asyncio.sleep(2.0)
                assert not any(task.done() for task in waiting)  # queued in the handle, not refused
                started = time.monotonic()
                refused = await client.post("/v1/chat/completions", json=body("One too many.", max_tokens=2))
                assert time.monotonic() - started < 5
                assert refused.status_code == 429, refused.text
                error = refused.json()["error"]
                assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
                assert refused.headers["retry-after"] == "1" and "x-kvchat-replica" not in refused.headers
            # The streams are closed (their requests cancelled): the queued requests are served.
            for response in await asyncio.gather(*waiting):
                assert response.status_code == 200, response.text

    asyncio.run(scenario())


def test_conversations_stay_on_one_replica_and_survive_a_replica_dying(cluster: str) -> None:
    client = openai.OpenAI(base_url=f"{cluster}/v1", api_key=KEYS[0], max_retries=0)
    topics = ("rivers of Europe", "the history of clocks", "how bees dance")
    conversations = {topic: [{"role": "system", "content": f"You answer questions about {topic}."}] for topic in topics}
    served: dict[str, list[str]] = {topic: [] for topic in topics}
    cached: dict[str, list[int]] = {topic: [] for topic in topics}
    for turn in range(3):
        for topic, messages in conversations.items():
            replica, prompt, hit = _turn(client, messages, f"Question {turn + 1} about {topic}, please.")
            served[topic].append(replica)
            cached[topic].append(hit)
            assert hit <= prompt
    for topic in topics:
        assert len(set(served[topic][1:])) == 1, f"{topic} moved between replicas: {served[topic]}"
        assert cached[topic][2] > cached[topic][1] > 0, cached[topic]
    metrics = httpx.get(f"{cluster}/metrics").text
    assert 'kvchat_routing_decisions_total{kind="prefix"}' in metrics
    assert 'kvchat_cached_tokens_total{replica="' in metrics

    victim = served[topics[0]][-1]
    _kill(victim)
    for turn in range(3, 5):
        for topic, messages in conversations.items():
            replica, prompt, hit = _turn(client, messages, f"Question {turn + 1} about {topic}, please.")
            assert replica != victim
            served[topic].append(replica)
            cached[topic].append(hit)
    # A moved conversation is read once on its new replica, then reused there.
    for topic in topics:
        assert served[topic][3] == served[topic][4]
        assert cached[topic][4] > cached[topic][3]


def test_responses_chain_continues_on_the_replica_that_stored_it(cluster: str) -> None:
    client = openai.OpenAI(base_url=f"{cluster}/v1", api_key=KEYS[0], max_retries=0)
    first = client.responses.with_raw_response.create(model=MODEL, input="Name a colour.", max_output_tokens=8)
    previous = first.parse()
    replicas = {first.headers["x-kvchat-replica"]}
    for text in ("Another one.", "And one more."):
        raw = client.responses.with_raw_response.create(
            model=MODEL, input=text, previous_response_id=previous.id, max_output_tokens=8
        )
        previous = raw.parse()
        replicas.add(raw.headers["x-kvchat-replica"])
        assert previous.usage is not None and previous.usage.input_tokens_details.cached_tokens > 0
    assert len(replicas) == 1
    other = openai.OpenAI(base_url=f"{cluster}/v1", api_key=KEYS[1], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(previous.id)


def test_errors_keep_openai_shapes_across_replicas(cluster: str) -> None:
    unauthorized = httpx.post(f"{cluster}/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["code"] == "invalid_api_key"
    too_big = httpx.post(
        f"{cluster}/v1/chat/completions",
        content=b"x" * (5 * 1024 * 1024),
        headers={"authorization": f"Bearer {KEYS[0]}", "content-type": "application/json"},
    )
    assert too_big.status_code == 413
    assert "error" in too_big.json()
    health = httpx.get(f"{cluster}/health").json()
    assert health["status"] == "ok" and health["replicas"]


def test_kvchat_serve_without_ray_does_not_import_ray() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from typer.testing import CliRunner; from kvchat.cli import app; "
        "result = CliRunner().invoke(app, ['serve', '--help']); "
        "assert result.exit_code == 0 and '--ray' in result.output, result.output; "
        "import kvchat.server; print('ray' in sys.modules)"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"


def test_a_stream_cut_by_a_dying_replica_ends_with_an_error_and_the_next_request_is_served(cluster: str) -> None:
    headers = {"authorization": f"Bearer {KEYS[0]}"}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from 1 to 500, one number per line."}],
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
    }
    events: list[str] = []
    with httpx.stream("POST", f"{cluster}/v1/chat/completions", json=body, headers=headers, timeout=120) as response:
        assert response.status_code == 200
        victim = response.headers["x-kvchat-replica"]
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    _kill(victim)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "replica_unavailable" and error["type"] == "server_error"
    client = openai.OpenAI(base_url=f"{cluster}/v1", api_key=KEYS[0], max_retries=0)
    replica, _, _ = _turn(client, [], "Say one word.")
    assert replica != victim
