"""`python -m hpc_rlhf.submit export`: a run's final checkpoint exported offline equals the
export the run wrote itself (tensor for tensor), with and without LoRA; an earlier checkpoint
exports too, and a directory that is no checkpoint gets one clear line."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from testlib import REPO, scaled

pytestmark = pytest.mark.distributed


def _submit(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hpc_rlhf.submit", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=scaled(600))


@pytest.mark.parametrize("lora", [0, 4])
def test_exported_final_checkpoint_equals_the_runs_own_export(tmp_path, lora):
    from hpc_rlhf.data.synthetic import write_toy_datasets
    write_toy_datasets(tmp_path / "runs" / "tiny_data", n_train=64, n_eval=8)
    run = tmp_path / "runs" / "sft"
    out = _submit("--config", str(REPO / "configs" / "sft_tiny.yaml"), "--local",
                  "train.num_steps=4", "checkpoint.save_every=2", "checkpoint.export_hf=true",
                  f"model.lora_rank={lora}", "launch.name=sft", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    final = _submit("export", str(run), "--out", str(tmp_path / "final"), cwd=tmp_path)
    assert final.returncode == 0 and final.stdout.strip().endswith(str(tmp_path / "final")), \
        final.stderr[-3000:]
    ours, theirs = (load_file(d / "model.safetensors") for d in (tmp_path / "final",
                                                                  run / "export"))
    assert sorted(ours) == sorted(theirs) and not any("lora" in k for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    early = _submit("export", str(run / "checkpoints" / "step_00000002"), cwd=tmp_path)
    assert early.returncode == 0, early.stderr[-3000:]
    step2 = load_file(run / "export_step_2" / "model.safetensors")
    assert any(not torch.equal(step2[k], ours[k]) for k in ours)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(run / "export_step_2")  # a loadable HF directory


def test_export_of_something_that_is_not_a_checkpoint_is_one_line(tmp_path):
    out = _submit("export", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith(f"export: {tmp_path} holds no "
                                                         "complete checkpoint"), out.stderr
