"""Plain `sbatch` (no submitit) of a script rendered from the same template as
slurm/ppo_70b.sbatch, running the real rank entry (hpc_rlhf.launch.main) with the role layout
of configs/tiny_disagg.yaml: 2 nodes x 2 ranks, 3 actor ranks + 1 rollout engine."""
import json
import sys

import pytest

from testlib import REPO

from hpc_rlhf.launch.sbatch import SbatchSpec, render_sbatch
from hpc_rlhf.launch.smoke_roles import expected_total

pytestmark = pytest.mark.slurm


def test_sbatch_rank_entry_builds_the_role_layout(slurm_cluster, tmp_path):
    steps = 3
    spec = SbatchSpec(job_name="tiny_main", nodes=2, gpus_per_node=0, nproc_per_node=2,
                      cpus_per_task=1, time="00:10:00",
                      config=str(REPO / "configs" / "tiny_disagg.yaml"),
                      overrides=(f"train.num_steps={steps}",),
                      extra_env=(("HPC_RLHF_PROGRAM", "smoke"),))
    script = tmp_path / "tiny_main.sbatch"
    script.write_text(render_sbatch(spec))
    run_dir, log = tmp_path / "run", tmp_path / "tiny_main.out"
    job = slurm_cluster.sbatch(script, sbatch_args=(f"--output={log}",), PYTHON=sys.executable,
                               RUN_DIR=str(run_dir), RDZV_PORT=slurm_cluster.rdzv_port())
    info = slurm_cluster.wait(job, timeout=120)
    text = log.read_text() if log.exists() else ""
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text
    ranks = [json.loads((run_dir / "smoke" / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["roles"] for r in ranks] == [["actor"]] * 3 + [["rollout"]], text
    assert sorted({r["node"] for r in ranks}) == ["node1", "node2"], text
    assert all(r["measured"]["job"] == 4 for r in ranks)
    result = json.loads((run_dir / "smoke_result.json").read_text())
    assert result["total"] == expected_total(steps, 4)
