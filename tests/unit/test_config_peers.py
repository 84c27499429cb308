"""Unknown keys that are OpenRLHF flag names or TRL config names point at the field that does
their job (not at whatever field is spelled alike)."""
import pytest

from hpc_rlhf.config import ConfigError, config_from_dict, load_config
from hpc_rlhf.config.loader import _all_keys
from hpc_rlhf.config.peers import PEER_NAMES

pytestmark = pytest.mark.unit


def test_every_peer_name_points_at_a_real_field_and_is_not_one():
    fields = set(_all_keys())
    leaves = {k.rsplit(".", 1)[-1] for k in fields}
    assert not [f for f, _ in PEER_NAMES.values() if f and f not in fields]
    # A peer name that is also one of our leaves would shadow the normal "did you mean".
    assert not [n for n in PEER_NAMES if n in leaves and PEER_NAMES[n][0].rsplit(".", 1)[-1] != n]


@pytest.mark.parametrize("key, field", [
    ("learning_rate", "train.actor_lr"),                 # difflib said ring_attn_size
    ("num_generations", "rollout.n_samples_per_prompt"),  # difflib said rollout.num_engines
    ("pretrain", "model.path"),                          # difflib said attn_implementation
    ("init_kl_coef", "algorithm.kl_coef"),
    ("micro_train_batch_size", "train.micro_batch_size"),
    ("train.pretrain", "model.path"),                    # inside a section too
    ("max_completion_length", "rollout.max_new_tokens"),
])
def test_peer_names_get_did_you_mean_our_field(key, field):
    section, _, leaf = key.rpartition(".")
    data = {section: {leaf: 1}} if section else {leaf: 1}
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert f"unknown key {key} (did you mean {field}? {leaf} is the OpenRLHF/TRL name" \
        in str(e.value)


def test_peer_names_on_the_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  num_steps: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key actor_learning_rate \(did you mean "
                                          r"train.actor_lr\?"):
        load_config(cfg, ["actor_learning_rate=1e-6"])


def test_a_typo_of_our_own_field_still_gets_difflib():
    with pytest.raises(ConfigError, match=r"unknown key train.num_stpes \(did you mean "
                                          r"train.num_steps\?\)"):
        config_from_dict({"train": {"num_stpes": 3}})
