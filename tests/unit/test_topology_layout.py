"""Layout: roles, worlds and coordinates of every rank, checked against plain enumerations."""
import itertools

import pytest

from hpc_rlhf.topology import build_layout

pytestmark = pytest.mark.unit


def _cfg(*overrides):
    """A config with field checks only: layouts the planner supports beyond what the RL recipe
    drives today (separate critic / reward worlds, ring attention in RL) must still plan."""
    from hpc_rlhf.config import JobConfig
    from hpc_rlhf.config.fields import field_errors
    from hpc_rlhf.config.loader import _build, merge_overrides
    errors = []
    cfg = _build(JobConfig, merge_overrides({}, ["model.path=tiny:llama", *overrides]), "", errors)
    assert not errors and not field_errors(cfg.topology, "topology"), errors
    return cfg


def test_colocated_every_rank_has_every_role_and_one_world():
    cfg = _cfg("topology.nodes=2", "topology.procs_per_node=4", "rollout.tensor_parallel_size=2",
               "algorithm.name=ppo", "algorithm.kl_coef=0.01")
    lay = build_layout(cfg)
    assert lay.worlds == (("all", tuple(range(8))),)
    for r in lay.ranks:
        assert r.roles == ("actor", "ref", "critic", "rollout")
        assert (r.node, r.local_rank) == divmod(r.rank, 4)
        assert (r.engine, r.engine_tp_rank) == divmod(r.rank, 2)
        assert (r.world_rank, r.world_size) == (r.rank, 8)
    assert lay.num_engines == 4 and lay.sync_ranks == ()


def test_disaggregated_blocks_in_order_actor_critic_reward_rollout():
    cfg = _cfg("topology.mode=disaggregated", "topology.nodes=2", "topology.procs_per_node=4",
               "algorithm.name=ppo", "topology.critic_ranks=2", "topology.reward_ranks=1",
               "reward.source=model", "model.reward_model_path=rm", "rollout.num_engines=2",
               "rollout.tensor_parallel_size=2", "train.batch_size=4", "train.micro_batch_size=1",
               "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2")
    lay = build_layout(cfg)
    # actor = 8 - 4 rollout - 2 critic - 1 reward = 1 rank
    assert [(n, m) for n, m in lay.worlds] == [
        ("actor", (0,)), ("critic", (1, 2)), ("reward", (3,)),
        ("rollout0", (4, 5)), ("rollout1", (6, 7))]
    roles = [r.roles for r in lay.ranks]
    assert roles == [("actor",), ("critic",), ("critic",), ("reward",)] + [("rollout",)] * 4
    assert [(r.engine, r.engine_tp_rank) for r in lay.ranks[4:]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(not r.is_trainer for r in lay.ranks[4:])
    assert [r.world_rank for r in lay.ranks] == [0, 0, 1, 0, 0, 1, 0, 1]
    assert lay.sync_ranks == (0, 4, 5, 6, 7)
    assert lay.trainer_ranks == (0, 1, 2, 3)


def test_disaggregated_critic_and_reward_share_actor_ranks_when_zero():
    cfg = _cfg("topology.mode=disaggregated", "topology.procs_per_node=4", "algorithm.name=ppo",
               "algorithm.kl_coef=0.1", "reward.source=model", "model.reward_model_path=rm",
               "train.batch_size=6", "train.micro_batch_size=2", "rollout.prompts_per_step=3",
               "rollout.n_samples_per_prompt=2")
    lay = build_layout(cfg)
    assert lay.ranks[0].roles == ("actor", "ref", "critic", "reward")
    assert lay.ranks[3].roles == ("rollout",)
    assert lay.world_members("actor") == (0, 1, 2) and lay.world_members("rollout0") == (3,)


@pytest.mark.parametrize("tp,sp,n", [(1, 1, 4), (2, 1, 8), (1, 2, 8), (2, 2, 8), (2, 4, 16)])
def test_trainer_coordinates_and_subgroups_partition_the_world(tp, sp, n):
    cfg = _cfg(f"topology.procs_per_node={n}", f"train.autotp_size={tp}",
               f"train.ring_attn_size={sp}", "train.zero_stage=2", "train.trainer=sft",
               "train.micro_batch_size=1", f"train.batch_size={n}")
    lay = build_layout(cfg)
    dp = n // (tp * sp)
    assert (lay.dp_size, lay.tp_size, lay.sp_size) == (dp, tp, sp)
    # naive reference: enumerate (dp, sp, tp) with tp fastest
    expect = list(itertools.product(range(dp), range(sp), range(tp)))
    assert [(r.dp_rank, r.sp_rank, r.tp_rank) for r in lay.ranks] == expect
    for kind in ("dp", "tp", "sp"):
        groups = lay.subgroups("all", kind)
        flat = sorted(x for g in groups for x in g)
        assert flat == list(range(n)), kind  # a partition
        size = {"dp": dp, "tp": tp, "sp": sp}[kind]
        assert all(len(g) == size for g in groups)
        for g in groups:  # members differ only in their own coordinate
            others = {"dp": lambda r: (r.tp_rank, r.sp_rank), "tp": lambda r: (r.dp_rank, r.sp_rank),
                      "sp": lambda r: (r.dp_rank, r.tp_rank)}[kind]
            assert len({others(lay.ranks[i]) for i in g}) == 1
    # AutoTP groups are consecutive ranks (one node)
    assert all(g == tuple(range(g[0], g[0] + tp)) for g in lay.subgroups("all", "tp"))
    assert "rollout" not in lay.ranks[0].roles  # sft does not generate


def test_world_size_mismatch_names_the_fields():
    with pytest.raises(ValueError, match=r"WORLD_SIZE.*topology.nodes=1 x topology.procs_per_node=2"):
        build_layout(_cfg("topology.procs_per_node=2"), world_size=3)


def test_critic_ranks_not_divisible_by_ring_size_is_refused():
    cfg = _cfg("topology.mode=disaggregated", "topology.procs_per_node=8", "algorithm.name=ppo",
               "topology.critic_ranks=3", "train.ring_attn_size=2", "topology.actor_ranks=4",
               "train.batch_size=16", "train.micro_batch_size=1")
    with pytest.raises(ValueError, match="world 'critic' has 3 ranks"):
        build_layout(cfg)


def test_describe_has_a_line_per_rank_with_node_and_gpu():
    lay = build_layout(_cfg("topology.nodes=2", "topology.procs_per_node=2"))
    lines = lay.describe().splitlines()
    assert len(lines) == 2 + 4
    assert lines[-1].split()[:3] == ["1", "1", "3"]  # node 1, gpu 1, rank 3
