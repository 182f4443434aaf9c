"""Prefix-aware routing: the index against a real vLLM event stream, the scorer, and the router choosing by
prefix in front of engines (real sockets, fake engines)."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from routertools import Routing as RouterThread

from raylm.errors import ConfigError
from raylm.model_settings import Routing
from raylm.serving.kv_events import decode, follow
from raylm.serving.policy import LeastInFlight, PrefixAware, make_policy
from raylm.serving.prefix_index import PrefixIndex, Stored, chain_keys, token_blocks
from raylm.serving.prompts import text_prefix
from raylm.serving.routes import Upstream
from raylm.testing.fake_engine import FakeEngineThread
from raylm.waiting import wait_until

RECORDING = msgpack.unpackb((Path(__file__).parent / "data" / "vllm-0.32-kv-events.msgpack").read_bytes(), raw=False)
BLOCK = RECORDING["block_size"]


def batches(messages):
    return [decode(message[2]) for message in messages]


def prompt_keys(index):
    return chain_keys(token_blocks(RECORDING["prompt_tokens"][index], BLOCK))


def test_the_index_holds_what_a_real_vllm_said_it_stored():
    index = PrefixIndex()
    for events in batches(RECORDING["messages"][: RECORDING["messages_before_reset"]]):
        index.apply("r1", events)
    assert index.block_size == BLOCK
    for prompt in range(3):
        keys = prompt_keys(prompt)
        assert len(keys) >= 1
        assert index.matched(keys, ["r1", "r2"]) == {"r1": len(keys), "r2": 0}
    # the two tenant prompts share their system prompt's blocks, not the last ones
    first, second = prompt_keys(0), prompt_keys(1)
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert 0 < shared < len(first)
    assert index.matched(second[:shared] + first[shared:], ["r1"]) == {"r1": len(first)}


def test_a_cleared_cache_and_evicted_blocks_leave_the_index():
    index = PrefixIndex()
    before = RECORDING["messages_before_reset"]
    messages = RECORDING["messages"]
    for events in batches(messages[:before]):
        index.apply("r1", events)
    everything = batches(messages[before:])
    index.apply("r1", everything[0])  # the reset: AllBlocksCleared
    assert index.matched(prompt_keys(2), ["r1"]) == {"r1": 0}
    for events in everything[1:]:
        index.apply("r1", events)
    # what the engine still holds, by its own hashes: stored since the reset, less removed
    held = set()
    for events in everything:
        for event in events:
            if isinstance(event, Stored):
                held |= set(event.block_hashes)
            elif hasattr(event, "block_hashes"):
                held -= set(event.block_hashes)
            else:
                held = set()
    assert len(index.engine_keys["r1"]) == len(held) == index.blocks()
    assert index.blocks() < sum(len(e.block_hashes) for b in everything for e in b if isinstance(e, Stored))


def test_a_lost_event_claims_nothing_after_it():
    first_batch, *rest = batches(RECORDING["messages"][: RECORDING["messages_before_reset"]])
    index = PrefixIndex()
    for events in rest:  # the batch that started the first prompt's chain never arrived
        index.apply("r1", events)
    assert index.matched(prompt_keys(0), ["r1"]) == {"r1": 0}
    index.forget("r1")
    assert index.blocks() == 0


def test_the_follower_reads_a_real_zmq_stream_and_says_when_events_were_lost():
    context = zmq.Context.instance()
    publisher = context.socket(zmq.PUB)
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    delivered, stopping = [], threading.Event()
    thread = threading.Thread(target=follow, args=(f"tcp://127.0.0.1:{port}", delivered.append, stopping))
    thread.start()
    try:
        time.sleep(0.5)  # the subscription reaches the publisher
        topic, _, payload = RECORDING["messages"][0]
        for sequence in (0, 1, 5):  # 2 to 4 lost
            publisher.send_multipart([topic, sequence.to_bytes(8, "big"), payload])
        wait_until(lambda: len(delivered) == 4, timeout_s=5, poll_s=0.05, on_timeout=lambda: AssertionError(delivered))
    finally:
        stopping.set()
        thread.join(5)
        publisher.close()
    assert [type(d).__name__ for d in delivered] == ["list", "list", "NoneType", "list"]
    assert delivered[0] == decode(payload)


def upstreams(*loads):
    replicas = []
    for number, load in enumerate(loads, start=1):
        upstream = Upstream("m", "127.0.0.1", 1, f"r{number}")
        upstream.in_flight = load
        replicas.append(upstream)
    return replicas


def pick(policy, replicas, request):
    choice = policy.choose(replicas, request, policy.prefix(request))
    return choice.upstream, choice.reason


def tenant(name, question="What now?"):
    return {"model": "m", "prompt": f"You are the assistant of {name}. " * 40 + question}


def test_the_scorer_weighs_the_prefix_held_against_load():
    policy = make_policy(Routing("approximate"))
    r1, r2 = upstreams(0, 0)
    first, why = pick(policy, [r1, r2], tenant("alpha"))
    assert why == "load"  # nobody holds it yet
    again, why = pick(policy, [r1, r2], tenant("alpha", "And then?"))
    assert (again, why) == (first, "prefix")
    other = r2 if first is r1 else r1
    first.in_flight = 1  # busier by one: the prefix still wins
    assert pick(policy, [r1, r2], tenant("alpha"))[0] is first
    first.in_flight = 12  # far busier than the other: the request spills
    assert pick(policy, [r1, r2], tenant("alpha")) == (other, "spilled")


def test_a_hot_tenant_spreads_over_both_replicas():
    policy = make_policy(Routing("approximate"))
    replicas = upstreams(0, 0)
    for number in range(40):  # one tenant's requests, none finished yet
        chosen, _ = pick(policy, replicas, tenant("hot", f"question {number}"))
        chosen.in_flight += 1
    assert min(r.in_flight for r in replicas) >= 15, [r.in_flight for r in replicas]


def test_without_shared_prefixes_it_is_least_in_flight():
    policy = make_policy(Routing("approximate"))
    replicas = upstreams(3, 1, 2)
    chosen, why = pick(policy, replicas, {"model": "m", "prompt": "short"})
    assert (chosen.replica_id, why) == ("r2", "load")
    equal = upstreams(0, 0, 0)
    picks = {pick(policy, equal, {"model": "m", "prompt": f"q{n}"})[0].replica_id for n in range(6)}
    assert picks == {"r1", "r2", "r3"}  # equal scores take turns


HOMES = """
import sys
from raylm.model_settings import Routing
from raylm.serving.policy import make_policy
from raylm.serving.routes import Upstream
policy = make_policy(Routing("approximate"))
homes = {}
for name in sorted(range(12), reverse=sys.argv[1] == "reversed"):
    request = {"model": "m", "prompt": f"You are the assistant of tenant {name}. " * 40}
    replicas = [Upstream("m", "127.0.0.1", 1, replica) for replica in ("r1", "r2", "r3")]
    homes[name] = policy.choose(replicas, request, policy.prefix(request))[0].replica_id
print(" ".join(homes[name] for name in range(12)))
"""


def test_equally_good_replicas_are_ranked_alike_by_every_router_process():
    # Two router processes (Python salts its string hashes per process), seeing new tenants in opposite
    # orders, send each to the same replica; the tenants spread over all three.
    homes = [
        subprocess.run([sys.executable, "-c", HOMES, order], env={**os.environ, "PYTHONHASHSEED": seed}, text=True,
                       capture_output=True, check=True).stdout.split()
        for seed, order in (("1", "sorted"), ("2", "reversed"))
    ]  # fmt: skip
    assert homes[0] == homes[1] and set(homes[0]) == {"r1", "r2", "r3"}, homes


def test_the_precise_policy_follows_events_and_waits_for_them():
    policy = make_policy(Routing("precise"), tokenizer_path=None)
    assert isinstance(policy, PrefixAware) and policy.follows_events
    r1, r2 = upstreams(0, 0)
    # no event yet: the approximate fallback chooses (and no tokenizer is loaded)
    assert pick(policy, [r1, r2], tenant("alpha"))[1] == "load"
    assert policy.index.block_size is None and isinstance(make_policy(Routing("least-in-flight")), LeastInFlight)


def test_the_default_policy_is_the_best_the_engine_supports():
    assert Routing().for_engine(publishes_events=True).policy == "precise"
    assert Routing().for_engine(publishes_events=False).policy == "approximate"
    assert Routing("least-in-flight").for_engine(publishes_events=True).policy == "least-in-flight"
    assert make_policy(Routing()).name == "approximate"  # the engine unknown: what every engine allows


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"policy": "nearest"},
            "unknown routing policy 'nearest'; choose one of least-in-flight, approximate, precise",
        ),
        ({"policy": "approximate", "load_weight": -1}, "routing: load_weight must be a number from 0 to 100, got -1"),
        ({"policy": "approximate", "prefix_weight": "3"}, "routing: prefix_weight must be a number from 0 to 100"),
    ],
)
def test_bad_routing_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        Routing(**settings)


def routing_metrics(router):
    text = httpx.get(f"{router.url}/metrics").text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    decisions = {(s.labels["policy"], s.labels["reason"]): s.value for s in samples
                 if s.name == "raylm_routing_decisions_total"}  # fmt: skip
    blocks = {name: sum(s.value for s in samples if s.name == f"raylm_routing_{name}_blocks_total")
              for name in ("prompt", "held")}  # fmt: skip
    return decisions, blocks


def test_the_router_sends_a_tenant_to_the_replica_that_has_its_prefix():
    with FakeEngineThread() as one, FakeEngineThread() as two:
        router = RouterThread(["m"], policies={"m": make_policy(Routing("approximate"))})
        with router:
            router.call(router.table.register, "m", one.url, "one", None)
            router.call(router.table.register, "m", two.url, "two", None)
            for name in ("alpha", "beta", "gamma", "delta"):
                begun = (one.stats.begun, two.stats.begun)
                for question in range(3):
                    body = {**tenant(name, f"question {question}"), "chunks": 1}
                    assert httpx.post(f"{router.url}/v1/completions", json=body).status_code == 200
                took = (one.stats.begun - begun[0], two.stats.begun - begun[1])
                assert sorted(took) == [0, 3], f"tenant {name}'s requests went to both replicas: {took}"
            decisions, blocks = routing_metrics(router)
            assert decisions == {("approximate", "load"): 4, ("approximate", "prefix"): 8}
            # a prompt is 10 text blocks (beta's 9), all held but by each tenant's first request
            assert blocks == {"prompt": 3 * (10 + 9 + 10 + 10), "held": 2 * (10 + 9 + 10 + 10)}
            (card,) = httpx.get(f"{router.url}/v1/models").json()["data"]
            assert card["routing"] == "approximate"


def test_text_prefixes_differ_by_model_and_ignore_short_prompts():
    assert text_prefix({"model": "a", "prompt": "x" * 300}) != text_prefix({"model": "b", "prompt": "x" * 300})
    assert text_prefix({"model": "a", "prompt": "short"}) == []
    chat = {"model": "a", "messages": [{"role": "system", "content": "s" * 200}, {"role": "user", "content": "q"}]}
    assert len(text_prefix(chat)) == 1 and json.dumps(chat)


def test_the_router_tokenizes_prompts_off_its_loop_and_routes_by_what_an_engine_holds(tiny_llama):
    from transformers import AutoTokenizer

    policy = make_policy(Routing("precise"), str(tiny_llama))
    prompt = tenant("alpha")["prompt"]
    tokens = AutoTokenizer.from_pretrained(str(tiny_llama))(prompt).input_ids
    with FakeEngineThread() as one, FakeEngineThread() as two:
        router = RouterThread(["m"], policies={"m": policy})
        with router:
            router.call(router.table.register, "m", one.url, "one", None)
            router.call(router.table.register, "m", two.url, "two", None)
            # what replica two's engine would say: it stored the prompt's first 4 blocks of 16 tokens
            router.call(policy.index.apply, "two", [Stored((1, 2, 3, 4), None, tuple(tokens[:64]), 16)])
            wait_until(lambda: policy.prefix(tenant("alpha")) is not None, timeout_s=60, poll_s=0.2,
                       on_timeout=lambda: AssertionError("the tokenizer did not load"))  # fmt: skip
            for question in range(3):
                body = {**tenant("alpha", f"question {question}"), "chunks": 1}
                assert httpx.post(f"{router.url}/v1/completions", json=body).status_code == 200
            assert (one.stats.begun, two.stats.begun) == (0, 3)
            decisions, blocks = routing_metrics(router)
            assert decisions == {("precise", "prefix"): 3} and blocks["held"] == 3 * 4
