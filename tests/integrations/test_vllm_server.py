"""JetMoE through vLLM's multi-process path: one `vllm serve` process driven by the official openai client, and a
tensor-parallel (TP=2) engine. Runs where vLLM is installed (`make test-vllm`); skips elsewhere."""

import os
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
import transformers  # noqa: E402

import jetmoe  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from vllm_helpers import (  # noqa: E402
    KV_CACHE_BYTES,
    LOGPROB_ATOL,
    PROMPTS,
    close,
    engine,
    greedy,
    make_checkpoints,
    oracle,
)

BUNDLED = Path(jetmoe.__file__).parent / "assets" / "tiny"
SERVED_NAME = "jetmoe-tiny"
SERVER_START_S = 900


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `vllm serve` process (vLLM's defaults: multi-process, torch.compile) on the bundled tiny model."""
    import subprocess
    import time

    import httpx

    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    command = [
        str(Path(sys.executable).parent / "vllm"), "serve", str(BUNDLED),
        "--served-model-name", SERVED_NAME, "--port", str(port), "--dtype", "float32", "--seed", "0",
        "--max-model-len", "512", "--max-num-seqs", "8", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not start in {SERVER_START_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=120)


@pytest.fixture(scope="module")
def bundled_oracle():
    tokenizer = transformers.AutoTokenizer.from_pretrained(BUNDLED)
    config = jetmoe.JetMoeConfig.from_pretrained(BUNDLED)
    return oracle(BUNDLED, config, torch.float32), tokenizer


def _oracle_text(bundled_oracle, prompt_ids, max_tokens):
    model, tokenizer = bundled_oracle
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def test_server_lists_the_model(client):
    assert [m.id for m in client.models.list().data] == [SERVED_NAME]


def test_server_completion_is_the_oracles_greedy_text_streamed_or_not(client, bundled_oracle):
    prompt = "The Python language"
    done = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=40, temperature=0)
    expected = _oracle_text(bundled_oracle, bundled_oracle[1](prompt).input_ids, 40)
    assert done.choices[0].text == expected
    stream = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=40, temperature=0, stream=True)
    chunks = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(chunks) > 1
    assert "".join(chunks) == expected


def test_server_chat_is_the_oracles_greedy_text_streamed_or_not(client, bundled_oracle):
    messages = [{"role": "user", "content": "Write a list of numbers."}]
    done = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=32, temperature=0)
    tokenizer = bundled_oracle[1]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    expected = _oracle_text(bundled_oracle, list(prompt_ids), 32)
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected
    stream = client.chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=32, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == expected


# --- tensor parallelism ----------------------------------------------------------------------------------------


def _thread_binding(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers: this process's CPUs split in contiguous groups (vLLM's
    automatic binding wants a NUMA node per worker)."""
    cpus = sorted(os.sched_getaffinity(0))
    groups = [cpus[i * len(cpus) // ranks : (i + 1) * len(cpus) // ranks] or cpus[:1] for i in range(ranks)]
    return "|".join(",".join(map(str, group)) for group in groups)


def kv_heads_per_rank(model) -> int:
    """Run in each worker (pickled by name: a module-level function)."""
    return model.model.layers[0].self_attention.attn.num_kv_heads


def test_tensor_parallel_2_gives_the_oracles_greedy_tokens_and_logprobs(tmp_path, monkeypatch):
    path, config = make_checkpoints(tmp_path)["top2of8"]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", _thread_binding(2))
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model pickles a function to the workers
    llm = engine(path, "float32", enforce_eager=True, tensor_parallel_size=2)
    try:
        new_tokens = 48
        params = vllm.SamplingParams(temperature=0, max_tokens=new_tokens, logprobs=0, ignore_eos=True)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        (shards,) = set(llm.apply_model(kv_heads_per_rank))
    finally:
        close(llm)
    assert shards == config.num_key_value_heads // 2  # each rank holds half the K/V heads
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    oracle_tokens, oracle_logits = greedy(oracle(path, config, torch.float32), tokenizer, new_tokens)
    worst = 0.0
    for row, output in enumerate(outputs):
        tokens = list(output.outputs[0].token_ids)
        assert tokens == oracle_tokens[row]
        reference = torch.log_softmax(oracle_logits[row], dim=-1)
        for step, (token, logprobs) in enumerate(zip(tokens, output.outputs[0].logprobs)):
            worst = max(worst, abs(logprobs[token].logprob - reference[step, token].item()))
    print(f"TP=2 fp32: max |vLLM logprob - transformers logprob| = {worst:.2e}")
    assert worst < LOGPROB_ATOL
