"""Which global rank does what: a pure function of (config, world size), no processes needed.

Colocated: every rank is actor + ref (+ critic, + reward model) + a slice of a rollout engine,
all in one default world "all". Disaggregated: ranks [0, T) are trainers, in order actor
ranks, critic ranks, reward ranks, and ranks [T, N) are rollout engines of TP size P:

    N=8, T=4 (actor 3, critic 1), P=2:   0 1 2 | 3 | 4 5 | 6 7
                                         actor  crit eng0  eng1

Every *default world* ("actor", "critic", "reward", "rollout<e>", or "all") is what one
DeepSpeed engine or one vLLM engine sees as its whole job; both libraries assume they own the
default process group, so they must never share one with a rank that runs the other library.
Inside a trainer world, rank r has coordinates r = (dp * sp_size + sp) * tp_size + tp: AutoTP
groups are consecutive ranks (same node), ring (sequence-parallel) groups next, DP outermost.
"""
from __future__ import annotations

from dataclasses import dataclass

from hpc_rlhf.config import JobConfig, sizes
from hpc_rlhf.config.rules import GENERATING_TRAINERS

ROLES = ("actor", "ref", "critic", "reward", "rollout")
REF_TRAINERS = ("dpo", "kto", "iterative_dpo", "kd")  # always need a frozen reference/teacher


@dataclass(frozen=True)
class RankInfo:
    """One global rank's place in the job."""
    rank: int              # global rank (torchrun RANK)
    node: int              # rank // procs_per_node
    local_rank: int        # rank % procs_per_node: the device index on the node
    roles: tuple           # subset of ROLES, in that order
    world: str             # name of the default world this rank joins
    world_rank: int        # rank inside that world (what RANK becomes for vLLM/DeepSpeed)
    world_size: int        # size of that world (what WORLD_SIZE becomes)
    engine: int = -1       # rollout engine index (-1: serves no rollouts)
    engine_tp_rank: int = -1
    dp_rank: int = -1      # trainer coordinates inside its world (-1: not a trainer)
    tp_rank: int = -1
    sp_rank: int = -1

    @property
    def is_trainer(self) -> bool:
        return self.dp_rank >= 0


@dataclass(frozen=True)
class Layout:
    """Every rank's roles and every process group's members (global ranks)."""
    mode: str
    world_size: int
    procs_per_node: int
    ranks: tuple           # RankInfo per global rank
    worlds: tuple          # ((name, (global ranks...)), ...) default worlds, disjoint, cover all
    dp_size: int
    tp_size: int
    sp_size: int
    num_engines: int
    engine_tp: int
    timeout_s: int

    # --- queries -------------------------------------------------------------------------
    def info(self, rank: int) -> RankInfo:
        return self.ranks[rank]

    def world_members(self, name: str) -> tuple:
        for n, members in self.worlds:
            if n == name:
                return members
        raise KeyError(f"no default world {name!r}; worlds are {[n for n, _ in self.worlds]}")

    def ranks_with(self, role: str) -> tuple:
        return tuple(r.rank for r in self.ranks if role in r.roles)

    @property
    def trainer_ranks(self) -> tuple:
        return tuple(r.rank for r in self.ranks if r.is_trainer)

    @property
    def rollout_ranks(self) -> tuple:
        return self.ranks_with("rollout")

    def engine_ranks(self, engine: int) -> tuple:
        return tuple(r.rank for r in self.ranks if r.engine == engine)

    @property
    def sync_ranks(self) -> tuple:
        """Weight-sync group: actor world rank 0 first, then every rollout rank (empty when
        colocated: the weights move in-process)."""
        if self.mode == "colocated":
            return ()
        return (self.world_members("actor")[0],) + self.rollout_ranks

    def subgroups(self, world: str, kind: str) -> tuple:
        """Partition of a trainer world into 'dp' / 'tp' / 'sp' groups, as tuples of
        *world-local* ranks, in the same order on every rank (new_group needs that)."""
        members = self.world_members(world)
        infos = [self.ranks[g] for g in members]
        if not infos[0].is_trainer:
            raise ValueError(f"world {world!r} holds no trainers; it has no {kind} groups")
        coord = {"dp": lambda i: (i.tp_rank, i.sp_rank), "tp": lambda i: (i.dp_rank, i.sp_rank),
                 "sp": lambda i: (i.dp_rank, i.tp_rank)}[kind]
        groups: dict = {}
        for i in infos:
            groups.setdefault(coord(i), []).append(i.world_rank)
        return tuple(tuple(g) for _, g in sorted(groups.items()))

    def describe(self) -> str:
        """Text table, one line per node and GPU, for the dry run and layout.txt."""
        lines = [f"mode={self.mode} world={self.world_size} "
                 f"({self.world_size // self.procs_per_node} nodes x {self.procs_per_node}) "
                 f"actor dp={self.dp_size} tp={self.tp_size} sp={self.sp_size} "
                 f"engines={self.num_engines} x TP {self.engine_tp} timeout={self.timeout_s}s",
                 f"{'node':>4} {'gpu':>3} {'rank':>4}  {'roles':<28} {'world':<10} "
                 f"{'w.rank':>6}  coords"]
        for r in self.ranks:
            coords = []
            if r.is_trainer:
                coords.append(f"dp={r.dp_rank} tp={r.tp_rank} sp={r.sp_rank}")
            if r.engine >= 0:
                coords.append(f"engine={r.engine} tp={r.engine_tp_rank}")
            lines.append(f"{r.node:>4} {r.local_rank:>3} {r.rank:>4}  {'+'.join(r.roles):<28} "
                         f"{r.world:<10} {r.world_rank:>3}/{r.world_size:<3} {'  '.join(coords)}")
        return "\n".join(lines)


def _trainer_coords(local: int, tp: int, sp: int) -> tuple:
    """(dp, tp, sp) of world-local rank `local`; tp innermost, dp outermost."""
    return local // (tp * sp), local % tp, (local // tp) % sp


def build_layout(cfg: JobConfig, world_size: int | None = None) -> Layout:
    """The layout of `cfg` on `world_size` ranks (default: nodes x procs_per_node)."""
    s, t, tr = sizes(cfg), cfg.topology, cfg.train
    n = s.world if world_size is None else world_size
    if n != s.world:
        raise ValueError(f"the job has {n} ranks (WORLD_SIZE) but topology.nodes={t.nodes} x "
                         f"topology.procs_per_node={t.procs_per_node} = {s.world}; launch "
                         "with matching --nnodes/--nproc-per-node or fix the config")
    ppn = t.procs_per_node
    generates = tr.trainer in GENERATING_TRAINERS
    ppo = tr.trainer == "rl" and cfg.algorithm.name == "ppo"
    rm = generates and cfg.reward.source == "model"
    ref = tr.trainer in REF_TRAINERS or (tr.trainer == "rl" and cfg.algorithm.kl_coef > 0)
    tp, sp, etp = tr.autotp_size, tr.ring_attn_size, cfg.rollout.tensor_parallel_size

    # (world name, roles, size, is_trainer) in global-rank order
    if t.mode == "colocated":
        roles = ("actor",) + (("ref",) if ref else ()) + (("critic",) if ppo else ()) \
            + (("reward",) if rm else ()) + (("rollout",) if generates else ())
        blocks = [("all", roles, n, True)]
    else:
        actor_roles = ("actor",) + (("ref",) if ref else ()) \
            + (("critic",) if ppo and not s.critic_ranks else ()) \
            + (("reward",) if rm and not s.reward_ranks else ())
        blocks = [("actor", actor_roles, s.actor_ranks, True)]
        if s.critic_ranks:
            blocks.append(("critic", ("critic",), s.critic_ranks, True))
        if s.reward_ranks:
            blocks.append(("reward", ("reward",), s.reward_ranks, True))
        blocks += [(f"rollout{e}", ("rollout",), etp, False) for e in range(s.num_engines)]

    infos, worlds, start = [], [], 0
    for name, roles, size, trainer in blocks:
        btp, bsp = (tp, sp) if name in ("all", "actor", "critic") else (1, 1)
        if trainer and size % (btp * bsp):
            raise ValueError(f"world {name!r} has {size} ranks, not divisible by train."
                             f"autotp_size={tp} x train.ring_attn_size={sp}; change the "
                             f"{name} rank count or those sizes")
        members = tuple(range(start, start + size))
        worlds.append((name, members))
        for local, g in enumerate(members):
            extra = {}
            if trainer:
                extra.update(zip(("dp_rank", "tp_rank", "sp_rank"), _trainer_coords(local, btp, bsp)))
            if "rollout" in roles:
                offset = g if name == "all" else g - members[0] + etp * int(name[7:])
                extra.update(engine=offset // etp, engine_tp_rank=offset % etp)
            infos.append(RankInfo(rank=g, node=g // ppn, local_rank=g % ppn, roles=roles,
                                  world=name, world_rank=local, world_size=size, **extra))
        start += size
    if start != n:
        raise ValueError(f"roles cover {start} ranks but the world has {n}; see "
                         "topology.actor_ranks / critic_ranks / reward_ranks")
    engines = (n // etp if t.mode == "colocated" else s.num_engines) if generates else 0
    actor_n = n if t.mode == "colocated" else s.actor_ranks
    return Layout(mode=t.mode, world_size=n, procs_per_node=ppn, ranks=tuple(infos),
                  worlds=tuple(worlds), dp_size=actor_n // (tp * sp), tp_size=tp, sp_size=sp,
                  num_engines=engines, engine_tp=etp if generates else 0,
                  timeout_s=t.timeout_s)
