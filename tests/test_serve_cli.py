"""`raytp serve` and `serve run` as a user reaches them from a shell: the argument checks,
and a real `raytp serve` process (its own local Ray) answering through the official
``openai`` client with transformers' greedy tokens on the tiny float64 Llama of
tests/test_serve.py, then stopped with Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package uses
transformers = pytest.importorskip("transformers")

from test_serve import KEY, MAX, NAME, TEXTS, _free_port, tiny_llama  # noqa: E402

import raytp.serve  # noqa: E402  (the serve extra, checked just above)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("serve"))


def _greedy(path: str, ids: list[int], eos: int) -> list[int]:
    """transformers' greedy new ids for one prompt, without the stop id (as the server returns them)."""
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    out = hf.generate(torch.tensor([ids]), max_new_tokens=MAX, do_sample=False, eos_token_id=eos,
                      pad_token_id=eos)[0, len(ids):].tolist()
    return out[:out.index(eos)] if eos in out else out


def test_serve_run_and_the_cli_check_their_arguments(model, capsys):
    from ray.serve import Application

    from raytp import cli

    assert isinstance(raytp.serve.build_app({"pretrained_path": model[0], "tp": "2", "max_batch": "4"}),
                      Application)
    with pytest.raises(ValueError, match="holds no config.json"):
        raytp.serve.app("/nonexistent", tp=2)
    with pytest.raises(SystemExit, match="holds no config.json"):
        cli.main(["serve", "/nonexistent", "--tp", "2"])


def test_raytp_serve_from_a_shell(model):
    """`raytp serve PATH` as a user starts it: its own process and local Ray; at tp=2 it
    answers with transformers' greedy ids; SIGTERM (as `kill` or `docker stop` sends it)
    stops it as Ctrl-C does, with exit status 0, and nothing of its process group (its Ray,
    the replica, the ranks) is left."""
    path, tok, eos = model
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAYTP_API_KEY"] = KEY
    proc = subprocess.Popen(
        [sys.executable, "-m", "raytp", "serve", path, "--tp", "2", "--port", str(port), "--device", "cpu",
         "--dtype", "float64", "--max-batch", "4", "--max-len", "256", "--model-name", NAME],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        _wait_for_health(f"http://127.0.0.1:{port}", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        out = client.completions.create(model=NAME, prompt=TEXTS[0], max_tokens=MAX, temperature=0)
        assert out.choices[0].token_ids == _greedy(path, tok.encode(TEXTS[0]).ids, eos)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, log[-3000:]
        assert f"serving {path} at http://127.0.0.1:{port}/v1" in log and "stopping: the replica" in log
        deadline = time.monotonic() + 60
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group_alive(proc.pid), "processes of raytp serve's group outlived it"
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_for_health(url: str, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"raytp serve exited: {proc.stdout.read()[-3000:]}")
        try:
            health = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
            if health.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"raytp serve did not answer /health in {timeout_s} s")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
