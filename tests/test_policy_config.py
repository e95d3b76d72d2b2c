"""Policies load by name, path or dict; a policy file's mistakes are refused by key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from distnorm.policy import Override, Policy, PolicyError, available_policies, load_policy

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("default", "fine-tune-detection", "micro-batch-from-scratch")


def test_shipped_policies_load_by_name() -> None:
    assert available_policies() == SHIPPED
    for name in SHIPPED:
        policy = load_policy(name)
        assert policy.name == name and policy.description
    assert load_policy(None).name == "default"


def test_default_yaml_spells_out_the_built_in_defaults() -> None:
    loaded = load_policy("default")
    assert dataclasses.replace(loaded, description="", source="") == Policy()


def test_repository_configs_are_the_shipped_files() -> None:
    for name in SHIPPED:
        top_level = REPO / "configs" / f"{name}.yaml"
        packaged = REPO / "distnorm" / "policy" / "configs" / f"{name}.yaml"
        assert top_level.read_bytes() == packaged.read_bytes(), name
        assert load_policy(top_level) == dataclasses.replace(
            load_policy(name), source=f"policy file {str(top_level)!r}"
        )
    assert sorted(p.stem for p in (REPO / "configs").glob("*.yaml")) == sorted(SHIPPED)


def test_shipped_policies_differ_where_they_should() -> None:
    detection = load_policy("fine-tune-detection")
    assert detection.pretrained and detection.backbone == ("backbone.*",)
    micro = load_policy("micro-batch-from-scratch")
    assert micro.scratch_fallback == "bcn" and not micro.sync.cross_node


def test_a_partial_file_keeps_the_other_defaults(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "target_batch: 64\n"
        "sync: {max_group_size: 8}\n"
        "overrides:\n"
        "  by_name:\n"
        "    'head.*': keep\n"
        "    'neck.*': {norm: gn_ws, num_groups: 16}\n"
    )
    policy = load_policy(path)
    assert policy.name == "mine" and policy.target_batch == 64
    assert policy.sync.max_group_size == 8 and policy.sync.enabled
    assert policy.scratch_fallback == "bgn" and policy.group_norm.num_groups == 32
    assert policy.overrides.by_name == (
        ("head.*", Override("keep")),
        ("neck.*", Override("gn_ws", num_groups=16)),
    )
    assert load_policy(str(path)) == policy
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_policy(empty).target_batch == 32


def test_a_policy_passes_through_and_a_dict_loads() -> None:
    policy = load_policy({"pretrained": True, "backbone": ["body.*"]})
    assert policy.pretrained and policy.backbone == ("body.*",)
    assert load_policy(policy) is policy


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("target_batchsize: 32", "unknown key target_batchsize"),
        ("sync: {enabeld: false}", "unknown key sync.enabeld"),
        ("group_norm: {groups: 16}", "unknown key group_norm.groups"),
        ("overrides: {by_class: {}}", "unknown key overrides.by_class"),
        (
            "overrides: {by_name: {'a': {norm: bn, group: 2}}}",
            "unknown key overrides.by_name['a'].group",
        ),
        ("target_batch: 0", "key target_batch must be an integer >= 1, got 0"),
        ("target_batch: '32'", "key target_batch must be an integer >= 1, got '32'"),
        ("target_batch: true", "key target_batch must be an integer >= 1, got True"),
        ("pretrained: maybe", "key pretrained must be a bool, got 'maybe'"),
        ("sync: {max_group_size: 0}", "key sync.max_group_size must be an integer >= 1"),
        ("sync: {cross_node: 1}", "key sync.cross_node must be a bool"),
        ("sync: true", "key sync must be a mapping"),
        ("scratch_fallback: frozen_bn", "key scratch_fallback must be one of gn_ws, bcn, bgn"),
        ("backbone: 'backbone.*'", "key backbone must be a list of module-name patterns"),
        ("backbone: [1, 2]", "key backbone must be a list of module-name patterns"),
        ("group_norm: {num_groups: -1}", "key group_norm.num_groups must be an integer >= 1"),
        (
            "overrides: {by_name: {'a': batchnorm}}",
            "key overrides.by_name['a'].norm must be one of",
        ),
        ("overrides: {by_name: {'a': {num_groups: 4}}}", "overrides.by_name['a'] needs a 'norm'"),
        ("overrides: {by_name: ['a']}", "key overrides.by_name must map a pattern"),
        (
            "overrides: {by_type: {'X': 3}}",
            "overrides.by_type['X'] must be a norm name or a mapping",
        ),
        (
            "overrides: {by_name: {'a': {norm: sync_bn, num_groups: 4}}}",
            "overrides.by_name['a'].num_groups applies to gn_ws, bcn, bgn only",
        ),
        (
            "overrides: {by_name: {'a': {norm: gn_ws, sync_group_size: 4}}}",
            "overrides.by_name['a'].sync_group_size applies to sync_bn, bcn, bgn only",
        ),
        (
            "overrides: {by_name: {'a': {norm: sync_bn, sync_group_size: 0}}}",
            "overrides.by_name['a'].sync_group_size must be an integer >= 1",
        ),
        ("- a\n- b", "must be a YAML mapping"),
        ("target_batch: [32", "is not valid YAML"),
    ],
)
def test_bad_policy_files_are_refused_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)  # and the file


def test_missing_files_and_unknown_names_are_refused() -> None:
    with pytest.raises(PolicyError, match="shipped policies: default, fine-tune-detection"):
        load_policy("fine-tune-detectoin")
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy("no/such/policy.yaml")
    with pytest.raises(PolicyError, match="unknown key nope"):
        load_policy({"nope": 1})


def test_constructing_a_policy_directly_checks_it_too() -> None:
    with pytest.raises(PolicyError, match="target_batch"):
        Policy(target_batch=0)
    with pytest.raises(PolicyError, match="scratch_fallback"):
        dataclasses.replace(Policy(), scratch_fallback="ln")
