"""Settings: one tree from TOML + SCALEBUS_* env; every mistake names the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalebus import errors, settings


def test_defaults_load_without_a_file() -> None:
    cfg = settings.load(environ={})
    assert cfg.queue.url.startswith("sqlite:///")
    assert cfg.scale_set.url == "local://"


def test_env_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[controller]\nmax_instances = 3\n[worker]\ncommand = ["echo", "hi"]\n')
    cfg = settings.load(path, environ={"SCALEBUS_CONTROLLER__MAX_INSTANCES": "7", "SCALEBUS_LOG__LEVEL": "debug"})
    assert cfg.controller.max_instances == 7
    assert cfg.worker.command == ["echo", "hi"]
    assert cfg.log.level == "debug"


@pytest.mark.parametrize(
    ("toml", "environ", "key", "fix"),
    [
        pytest.param(
            "[controller]\nmax_instances = 0\n",
            {},
            "controller.max_instances",
            "SCALEBUS_CONTROLLER__MAX_INSTANCES",
            id="out-of-range",
        ),
        pytest.param("[controler]\nmax_instances = 3\n", {}, "controler", "spelling", id="unknown-section"),
        pytest.param("[worker]\nidle_timeout = 3\n", {}, "worker.idle_timeout", "spelling", id="unknown-key"),
        pytest.param(
            "", {"SCALEBUS_QUEUE__LOCK_DURATION_S": "abc"}, "queue.lock_duration_s", "valid value", id="bad-env"
        ),
        pytest.param("[log]\nformat = 'xml'\n", {}, "log.format", "valid value", id="bad-literal"),
    ],
)
def test_errors_name_key_and_fix(tmp_path: Path, toml: str, environ: dict[str, str], key: str, fix: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(toml)
    with pytest.raises(errors.ConfigError) as caught:
        settings.load(path, environ=environ)
    assert caught.value.key == key
    assert fix in str(caught.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="does not exist"):
        settings.load(tmp_path / "nope.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue\nurl=")
    with pytest.raises(errors.ConfigError, match="not valid TOML"):
        settings.load(bad, environ={})


def test_dump_toml_round_trips(tmp_path: Path) -> None:
    cfg = settings.load(
        environ={
            "SCALEBUS_WORKER__COMMAND": '["/opt/qc", "--say \\"hi\\""]',
            "SCALEBUS_CONTROLLER__PREWARM": "false",
            "SCALEBUS_STAGING__CHUNK_SIZE_BYTES": "1048576",
        }
    )
    path = tmp_path / "dumped.toml"
    path.write_text(settings.dump_toml(cfg))
    assert settings.load(path, environ={}) == cfg


# ------------------------------------------------------------------------------------------- several pools

TWO_POOLS = """
[controller]
max_instances = 6
poll_interval_s = 3
[worker]
idle_timeout_s = 9
command = ["qc"]

[[pools]]
name = "short"
[pools.queue]
url = "sqlite:///q.db?queue=short"
[pools.scale_set]
state_path = "short.db"
[pools.controller]
max_instances = 2

[[pools]]
name = "long"
[pools.queue]
url = "sqlite:///q.db?queue=long"
[pools.scale_set]
state_path = "long.db"
[pools.worker]
command = ["align", "--long"]
"""


def two_pools(tmp_path: Path, extra: str = "", environ: dict[str, str] | None = None) -> settings.Settings:
    path = tmp_path / "pools.toml"
    path.write_text(TWO_POOLS + extra)
    return settings.load(path, environ=environ or {})


def test_a_config_without_pools_is_the_one_default_pool() -> None:
    cfg = settings.load(environ={})
    assert cfg.pool_names() == (settings.DEFAULT_POOL,)
    assert cfg.for_pool(None) is cfg and cfg.for_pool("default") is cfg
    with pytest.raises(errors.ConfigError, match="no pool named 'fast'") as caught:
        cfg.for_pool("fast")
    assert caught.value.key == "pool"


def test_each_pool_inherits_the_top_level_tables_key_by_key(tmp_path: Path) -> None:
    cfg = two_pools(tmp_path)
    assert cfg.pool_names() == ("short", "long")
    short, long = cfg.for_pool("short"), cfg.for_pool("long")
    assert (short.controller.max_instances, long.controller.max_instances) == (2, 6)
    assert short.controller.poll_interval_s == long.controller.poll_interval_s == 3
    assert short.worker.command == ["qc"] and short.worker.idle_timeout_s == 9
    assert long.worker.command == ["align", "--long"], "a list set by the pool replaces the top-level one whole"
    assert long.worker.idle_timeout_s == 9
    assert (short.queue.url, long.scale_set.state_path) == ("sqlite:///q.db?queue=short", "long.db")
    assert short.pools == () and long.pools == (), "a pool's view is a one-pool tree"
    assert short.log == cfg.log and short.storage == cfg.storage, "the shared tables stay"


def test_the_environment_overrides_the_top_level_and_so_every_pool_that_does_not_set_the_key(
    tmp_path: Path,
) -> None:
    cfg = two_pools(
        tmp_path, environ={"SCALEBUS_CONTROLLER__MAX_INSTANCES": "9", "SCALEBUS_WORKER__IDLE_TIMEOUT_S": "4"}
    )
    assert cfg.controller.max_instances == 9
    assert cfg.for_pool("long").controller.max_instances == 9
    assert cfg.for_pool("short").controller.max_instances == 2, "a key the pool sets itself is the pool's"
    assert cfg.for_pool("short").worker.idle_timeout_s == cfg.for_pool("long").worker.idle_timeout_s == 4


def test_naming_no_pool_among_several_is_a_config_error_that_lists_them(tmp_path: Path) -> None:
    cfg = two_pools(tmp_path)
    with pytest.raises(errors.ConfigError, match="several pools") as caught:
        cfg.for_pool(None)
    assert "--pool (short, long)" in str(caught.value)
    with pytest.raises(errors.ConfigError, match="no pool named 'medium'") as unknown:
        cfg.for_pool("medium")
    assert "short, long" in str(unknown.value)


def test_a_single_pool_is_picked_without_a_name(tmp_path: Path) -> None:
    path = tmp_path / "one.toml"
    path.write_text('[[pools]]\nname = "only"\n[pools.controller]\nmax_instances = 3\n')
    cfg = settings.load(path, environ={})
    assert cfg.for_pool(None).controller.max_instances == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(
            '[[pools]]\nname = "short"\n[pools.queue]\nurl = "sqlite:///other.db?queue=x"\n'
            '[pools.scale_set]\nstate_path = "x.db"\n',
            "two pools are named 'short'",
            id="name",
        ),
        pytest.param(
            '[[pools]]\nname = "third"\n[pools.queue]\nurl = "sqlite:///q.db?queue=long"\n'
            '[pools.scale_set]\nstate_path = "x.db"\n',
            "pools 'long' and 'third' share one queue",
            id="queue",
        ),
        pytest.param(
            '[[pools]]\nname = "third"\n[pools.queue]\nurl = "sqlite:///q.db?queue=x"\n'
            '[pools.scale_set]\nstate_path = "./short.db"\n',
            "pools 'short' and 'third' share one scale set",
            id="local-scale-set",
        ),
        pytest.param(
            '[[pools]]\nname = "third"\n[pools.queue]\nurl = "sqlite:///q.db?queue=x"\n',
            "",
            id="inherited-scale-set-is-fine-once",
        ),
    ],
)
def test_pools_must_not_share_a_name_a_queue_or_a_scale_set(tmp_path: Path, extra: str, message: str) -> None:
    if not message:
        assert two_pools(tmp_path, extra).pool_names() == ("short", "long", "third")
        return
    with pytest.raises(errors.ConfigError) as caught:
        two_pools(tmp_path, extra)
    assert message in str(caught.value) and caught.value.key == "pools"
    assert "pools.toml" in str(caught.value), "the fix names the file"


def test_two_pools_on_one_vm_scale_set_are_refused_whatever_the_case_of_its_id(tmp_path: Path) -> None:
    vmss = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/{}"
    path = tmp_path / "azure.toml"
    path.write_text(
        f'[[pools]]\nname = "a"\n[pools.queue]\nurl = "sqlite:///a.db?queue=a"\n[pools.scale_set]\n'
        f'url = "{vmss.format("fleet")}"\nstate_path = "a.db"\n'
        f'[[pools]]\nname = "b"\n[pools.queue]\nurl = "sqlite:///a.db?queue=b"\n[pools.scale_set]\n'
        f'url = "{vmss.format("FLEET")}"\nstate_path = "b.db"\n'
    )
    with pytest.raises(errors.ConfigError, match="share one scale set"):
        settings.load(path, environ={})


def test_a_bad_value_in_a_pool_is_named_by_the_pool(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        two_pools(tmp_path, '[[pools]]\nname = "third"\n[pools.controller]\nmax_instanses = 2\n')
    assert caught.value.key == "pools.third.controller.max_instanses"
    assert "unknown setting" in str(caught.value) and "pools.toml" in str(caught.value)
    with pytest.raises(errors.ConfigError, match="should match pattern") as bad_name:
        settings.load(_write(tmp_path, '[[pools]]\nname = "a"\n[[pools]]\nname = "Bad Name"\n'), environ={})
    assert bad_name.value.key == "pools.Bad Name.name"


def test_the_shared_write_budget_is_set_at_the_top_level_only(tmp_path: Path) -> None:
    cfg = two_pools(tmp_path, environ={"SCALEBUS_CONTROLLER__MAX_WRITES_PER_MINUTE_TOTAL": "6"})
    assert cfg.for_pool("short").controller.max_writes_per_minute_total == 6
    path = _write(tmp_path, '[[pools]]\nname = "a"\n[pools.controller]\nmax_writes_per_minute_total = 3\n')
    with pytest.raises(errors.ConfigError, match="top-level \\[controller\\] only") as caught:
        settings.load(path, environ={})
    assert caught.value.key == "pools"


def test_dump_toml_round_trips_pools(tmp_path: Path) -> None:
    cfg = two_pools(tmp_path, environ={"SCALEBUS_LOG__LEVEL": "debug"})
    again = settings.load(_write(tmp_path, settings.dump_toml(cfg)), environ={})
    assert again == cfg
    assert again.for_pool("long") == cfg.for_pool("long")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "written.toml"
    path.write_text(text)
    return path
