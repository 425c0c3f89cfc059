"""torchrun with 2 gloo processes gives the losses and weights of 1 process with the same global batch."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moeforge.train import read_metrics, train
from moeforge.train.checkpoint import list_checkpoints, load_checkpoint

from .tiny import save_tiny

REPO = Path(__file__).resolve().parents[2]


def _run_stuck_aware(cmd: list[str], env: dict, marker: str, timeout: float) -> tuple[int, str]:
    """Run torchrun; if it hangs, make its workers print their stacks (moeforge's CLI dumps them on
    SIGUSR1), kill them all, and return the output, so a hang fails with a diagnosis, not a bare timeout."""
    import signal
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        pids = [pid for pid in pids if pid not in (proc.pid, os.getpid())]
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, _ = proc.communicate()
        return -1, f"torchrun did not finish in {timeout:.0f} s; worker stacks and output:\n{out}"


def _torchrun_two(args: list[str], cfg_file: Path) -> tuple[int, str]:
    """Run ``args`` (a module or script and its arguments) under torchrun with 2 processes, on one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return _run_stuck_aware(cmd, env, str(cfg_file), timeout=240)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_gloo_equals_one_process(tmp_path, make_cfg, tokenizer, parallel):
    # sigmoid_bias routers: their bias updates need the expert loads summed over processes;
    # a chat domain: examples carry different numbers of target tokens, so per-process means would differ
    model_dir = save_tiny(
        tmp_path / "m", tokenizer, moe={"num_experts": 4, "top_k": 2, "expert_size": 16, "router": "sigmoid_bias", "bias_update_rate": 0.01}
    )
    teacher = save_tiny(tmp_path / "t", tokenizer, seed=3)  # distillation: its logged KL must not depend on the processes
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"q": f"{a} times 3?", "a": f"{3 * a}" * (1 + a % 4)}) + "\n" for a in range(30)))
    cfg = make_cfg(
        model=str(model_dir),
        steps=4,
        batch_size=4,
        micro_batch_size=2,  # 1 process: 2 micro-batches accumulated; 2 processes: one each
        data=[
            {"name": "arith", "builtin": "arithmetic", "weight": 0.5, "max_tokens": 3000},
            {"name": "chat", "path": str(chat), "prompt_field": "q", "response_field": "a", "weight": 0.5, "valid_fraction": 0.2},
        ],
        mixture={"type": "dynamic", "update_every": 2, "eval_tokens": 256},
        parallel=parallel,
        distill={"teacher": str(teacher), "weight": 0.3},
        # ddp: task accuracy measured by the main process while the other waits (fsdp refuses it)
        eval_tasks={"tasks": ["arithmetic-choice"], "limit": 2} if parallel == "ddp" else {},
        eval_every=2,
    )
    train({**cfg, "output_dir": str(tmp_path / "one")})

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp_path / "two")}))
    code, stderr = _torchrun_two(["-m", "moeforge", "train", str(cfg_file)], cfg_file)
    assert code == 0, stderr[-3000:]

    def recs(out, kind):
        return [r for r in read_metrics(out) if r["kind"] == kind]

    one, two = recs(tmp_path / "one", "train"), recs(tmp_path / "two", "train")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["kl"] == pytest.approx(a["kl"], abs=1e-6) and a["kl"] > 0
        assert b["tokens"] == a["tokens"]
        assert list(b["weights"].values()) == pytest.approx(list(a["weights"].values()), abs=1e-6)
        for layer in a["expert_load"]:
            assert b["expert_load"][layer] == pytest.approx(a["expert_load"][layer], abs=1e-9)
    for a, b in zip(recs(tmp_path / "one", "eval"), recs(tmp_path / "two", "eval")):
        assert b["eval"] == pytest.approx(a["eval"], abs=1e-5)
    tasks = recs(tmp_path / "two", "tasks")
    assert [r["step"] for r in tasks] == ([2, 4] if parallel == "ddp" else [])
    assert [r["tasks"] for r in tasks] == [r["tasks"] for r in recs(tmp_path / "one", "tasks")]
    # the trained weights, router biases included, agree
    wa = load_checkpoint(list_checkpoints(tmp_path / "one")[-1][1], 0)["model"]
    wb = load_checkpoint(list_checkpoints(tmp_path / "two")[-1][1], 0)["model"]
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-5, rtol=1e-4)
    assert any(k.endswith("router.bias") and wa[k].abs().sum() > 0 for k in wa)
    assert (tmp_path / "two" / "checkpoints" / "step-000004" / "rng-1.json").is_file()


def test_device_choice_and_one_gpu_per_process(monkeypatch):
    from moeforge.errors import MoeforgeError
    from moeforge.train.config import load_config
    from moeforge.train.distributed import setup

    with pytest.raises(MoeforgeError, match="device"):
        load_config({"model": "m", "output_dir": "o", "data": [{"name": "p", "builtin": "prose"}], "device": "tpu"})
    if not torch.cuda.is_available():
        with pytest.raises(MoeforgeError, match="no CUDA GPU"):
            setup(device="cuda")
    # pretend this machine has one GPU: two processes per node cannot share it under NCCL
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(MoeforgeError, match="--nproc-per-node 1, or set device: cpu"):
        setup()
    assert setup(device="cpu").device.type == "cpu"  # the CPU is always allowed (gloo)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_process_group_is_freed_before_the_processes_exit(tmp_path, make_cfg, tiny_dir, parallel):
    # what holds the group is freed while every process is alive, before destroy_process_group: a
    # worker of a successful 2-process fsdp run once aborted at exit (-6) and failed the whole job
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(make_cfg(steps=2, save_every=2, parallel=parallel)))
    code, out = _torchrun_two([str(Path(__file__).with_name("_release_worker.py")), str(cfg_file)], cfg_file)
    assert code == 0, out[-3000:]
    # two processes may print onto one line ("...=Truerank-state ..."): match the words, not \w+
    states = re.findall(r"rank-state (group_alive=(?:True|False) model_kept=(?:True|False))", out)
    # the group's last reference is destroy_process_group's: DDP's reducer cycles and FSDP2's state
    # and DTensor caches are freed first. DDP's replica is a plain module; FSDP2's shards die with the group
    kept = parallel == "ddp"
    assert states == [f"group_alive=False model_kept={kept}"] * 2, out[-3000:]
