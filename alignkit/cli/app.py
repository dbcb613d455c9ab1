"""The ``alignkit`` command: a Hydra app plus helper sub-commands.

* ``alignkit [overrides...]`` runs a stage (default: the whole pipeline) with Hydra; ``-m``
  sweeps (``alignkit -m algorithm=reinforce seed=0,1``).
* ``alignkit plugins`` lists every installed plugin, where it comes from and its hooks.
* ``alignkit compare SWEEP_DIR`` plots and tabulates a sweep's runs (mean and 95% CI).
* ``alignkit export SRC OUT`` turns an RL checkpoint (any backend's), a reward model or a critic
  into a plain HF folder that the matching ``transformers`` Auto class loads.
* ``alignkit --help`` / ``--version`` are alignkit's own; ``--hydra-help`` is Hydra's.

Under ``torchrun`` (``backend=fsdp``) every rank runs the same command; rank 0 alone prints,
writes metrics and summaries and owns the W&B run.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError, ConfigError, HookError

CONFIG_PATH = "pkg://alignkit.conf"
DOCS_URL = "docs/ in the alignkit repository (README.md, docs/tutorial.md, docs/sweeps.md)"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
"""What an ``api_key_env`` value must look like: an environment variable's name."""


def registration() -> tuple[Any, Any]:
    """Discover plugins and let each contribute schemas and components (before composition)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from alignkit.config import register_base_schemas
    from alignkit.plugins import PluginManager
    from alignkit.registry import ComponentRegistry

    if not OmegaConf.has_resolver("alignkit.first"):
        OmegaConf.register_new_resolver("alignkit.first", lambda a, b: b if a is None else a)
    cs = ConfigStore.instance()
    register_base_schemas(cs)
    manager = PluginManager()
    registry = ComponentRegistry()
    manager.run_registration(cs, registry)
    return manager, registry


def _active_plugins(cfg: Any) -> dict[str, str]:
    """Plugin name -> the config entry that asked for it."""
    wanted: dict[str, str] = {}
    algo = cfg.get("algorithm")
    if algo is not None and algo.get("name"):
        wanted[str(algo.name)] = f"algorithm={algo.name}"
    for name in cfg.get("reward") or {}:
        wanted.setdefault(str(name), f"reward.{name}")
    for name in cfg.get("plugins") or []:
        wanted.setdefault(str(name), "plugins")
    return wanted


def wandb_settings(cfg: Any) -> dict[str, Any]:
    """W&B group, name and tags: from the config, else from the sweep and its overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    wcfg: dict[str, Any] = OmegaConf.to_container(cfg.logger.wandb, resolve=True)  # type: ignore[assignment]
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        # One group per sweep, one run per job named after what that job overrides.
        wcfg["group"] = wcfg.get("group") or "_".join(Path(hydra_cfg.sweep.dir).parts[-2:])
        wcfg["name"] = wcfg.get("name") or hydra_cfg.job.override_dirname or None
    algo = cfg.get("algorithm")
    tags = [*wcfg.get("tags", [])]
    if algo is not None and algo.get("name"):
        tags.append(f"algorithm:{algo.name}")
    tags += [f"reward:{name}" for name in cfg.get("reward") or {}]
    tags.append(f"backend:{cfg.backend.name}")
    wcfg["tags"] = list(dict.fromkeys(tags))
    return wcfg


def run_metadata() -> dict[str, Any]:
    """Git commit and package versions, recorded with every run for reproducibility."""
    import subprocess
    from importlib import metadata

    versions = {}
    for dist in ("alignkit", "torch", "transformers", "pluggy", "hydra-core", "wandb"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).parent,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"git_commit": commit, "versions": versions}


def run_stage(cfg: Any, run_dir: Path, manager: Any, registry: Any) -> dict[str, float]:
    """Activate the plugins the config names, build the context and run ``cfg.stage``."""
    from omegaconf import OmegaConf

    from alignkit.backends import build_backend
    from alignkit.context import RunContext
    from alignkit.engine.run_lock import run_guard
    from alignkit.plugins import PluginManager
    from alignkit.stages.common import build_task
    from alignkit.tracking import Tracker, console, print_summary
    from alignkit.validate import (
        check_algorithm_components,
        check_algorithm_needs,
        check_config_ranges,
    )

    # Out-of-range values fail here, naming the key, before any model loads.
    check_config_ranges(cfg)
    # A fresh manager per job: in a multirun each job activates its own plugins, and class
    # plugins get fresh state.
    manager = PluginManager(installed=manager.installed)
    wanted = _active_plugins(cfg)
    manager.activate(list(wanted), reason=wanted)
    # What depends on the active algorithm's declared needs fails here too, before any model.
    needs = manager.call("algorithm_needs", cfg=cfg)
    if needs is not None:
        check_algorithm_needs(cfg, needs)
        check_algorithm_components(cfg, registry, needs, manager.implementers("advantage"))
    if cfg.stage not in registry.names("stage"):
        raise ConfigError(
            f"stage={cfg.stage!r} is not a known stage; known: {', '.join(registry.names('stage'))}"
        )
    backend = build_backend(cfg.backend, registry)
    backend.setup()
    try:
        # Under torchrun every rank composes its own config; rank 0's run directory wins (a
        # timestamped default could differ by a second between ranks).
        run_dir = Path(backend.broadcast_object(str(run_dir)))
        # Rank 0 alone prints, logs metrics and owns the W&B run.
        console.quiet = not backend.is_main_process
        wcfg = wandb_settings(cfg)
        tracker = Tracker(
            run_dir,
            config={**OmegaConf.to_container(cfg, resolve=True), "meta": run_metadata()},
            wandb_cfg=wcfg,  # type: ignore[arg-type]
            enabled=backend.is_main_process,
        )
        ctx = RunContext(
            cfg=cfg,
            run_dir=run_dir,
            plugins=manager,
            registry=registry,
            tracker=tracker,
            backend=backend,
            rank=backend.rank,
            world_size=backend.world_size,
            device=backend.device,
        )
        exit_code = 1
        try:
            # The run directory is locked (and stale temporaries cleared) for the stage.
            with run_guard(ctx):
                ctx.generator = backend.seed(int(cfg.seed))
                ctx.task = build_task(ctx)
                summary = registry.build("stage", str(cfg.stage), ctx=ctx)
            summary = {"stage": str(cfg.stage), **summary}
            tracker.write_summary(summary)
            print_summary(f"alignkit {cfg.stage}: {run_dir}", summary)
            exit_code = 0
            return summary
        finally:
            tracker.finish(exit_code)
    finally:
        backend.teardown()


def _hydra_main(manager: Any, registry: Any, config_name: str) -> Callable[[], Any]:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    @hydra.main(config_path=CONFIG_PATH, config_name=config_name, version_base="1.3")
    def app(cfg: DictConfig) -> float | None:
        run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(HydraConfig.get().runtime.output_dir)
        try:
            refuse_undeclared_keys(cfg)
            summary = run_stage(cfg, run_dir, manager, registry)
        except AlignkitError as exc:
            report_error(exc)
            raise SystemExit(2) from None
        # The return value is what Hydra's sweepers (e.g. Optuna) optimise.
        value = summary.get(str(cfg.objective))
        for fallback in ("gold_score_policy", "rl_final/gold/score", "gold_score_sft", "win_rate"):
            value = summary.get(fallback) if value is None else value
        return float(value) if isinstance(value, int | float) else None

    return app


def refuse_undeclared_keys(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming every key no schema declares (see ``extra``)."""
    from alignkit.config import FREE_FORM, undeclared_keys

    unknown = undeclared_keys(cfg)
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)}: no schema (core or active plugin) declares "
            f"{'this key' if len(unknown) == 1 else 'these keys'}, so nothing would read it; "
            f"check the spelling, or put free-form keys under {FREE_FORM}.<key>"
        )


def check_secret_overrides(args: Sequence[str]) -> None:
    """Refuse an API key pasted as the value of ``...api_key_env=``, before Hydra runs.

    Hydra writes every override into ``.hydra/overrides.yaml``, ``config.yaml`` and
    ``hydra.yaml`` before the app runs, so a later check would leave the key on disk.
    The message does not repeat the value.
    """
    for arg in args:
        key, sep, value = arg.partition("=")
        name = key.lstrip("+~").rsplit(".", 1)[-1]
        value = value.strip().strip("'\"")
        if not sep or name != "api_key_env" or value in ("", "null"):
            continue
        if not _ENV_NAME.match(value):
            raise ConfigError(
                f"{key.lstrip('+~')} must be the NAME of an environment variable holding the "
                "API key (e.g. OPENAI_API_KEY), not the key itself; nothing was written"
            )


def version() -> str:
    """alignkit's version: the installed distribution's, else the package's."""
    from importlib import metadata

    try:
        return metadata.version("alignkit")
    except metadata.PackageNotFoundError:
        from alignkit import __version__

        return __version__


def config_groups() -> dict[str, list[str]]:
    """Config group -> options: the YAML files shipped in ``alignkit.conf`` plus the schemas
    plugins stored (``algorithm``, ``reward``); call after :func:`registration`."""
    from importlib import resources

    from hydra.core.config_store import ConfigStore

    groups: dict[str, set[str]] = {}
    for entry in resources.files("alignkit.conf").iterdir():
        if entry.is_dir() and not entry.name.startswith(("_", ".")):
            names = {f.name[:-5] for f in entry.iterdir() if f.name.endswith(".yaml")}
            groups.setdefault(entry.name, set()).update(names)
    for group, node in ConfigStore.instance().repo.items():
        if isinstance(node, dict) and group != "hydra" and not group.startswith("_"):
            groups.setdefault(group, set()).update(n.removesuffix(".yaml") for n in node)
    return {g: sorted(groups[g]) for g in sorted(groups) if groups[g]}


def help_text(registry: Any) -> str:
    """``alignkit --help``: usage, stages, sub-commands, groups, common overrides, docs."""
    groups = "\n".join(f"  {g}: {', '.join(opts)}" for g, opts in config_groups().items())
    stages = ", ".join(registry.names("stage"))
    return f"""\
usage: alignkit [KEY=VALUE ...]        run a stage (default: the whole pipeline)
       alignkit -m KEY=A,B ...         sweep: one job per combination (Hydra multirun)
       alignkit plugins                list installed plugins and their hooks
       alignkit compare SWEEP_DIR ...  compare runs: table and plots with 95% CIs
       alignkit export SRC OUT         checkpoint / reward model -> plain HF folder
       alignkit label QUEUE_DIR ...    the labelling app for people (docs/labelling.md)

stages (stage=...): {stages}
  pipeline = sft -> feedback -> reward_model -> rl -> eval

config groups (GROUP=OPTION):
{groups}

common overrides:
  experiment=smoke            tiny budget, runs in about a minute on a CPU
  run_dir=DIR                 where outputs go (default outputs/<date>/<time>)
  model.path=DIR  seed=N  rl.steps=N  rl.resume=true  logger=none  backend=fsdp
  extra.KEY=VALUE             free-form keys; other keys no schema declares are refused

options:
  -h, --help      this text
  --version       alignkit's version
  --cfg job       print the composed config instead of running
  --hydra-help    Hydra's own help (its flags: --info, --cfg, -p, --resolve, ...)

docs: {DOCS_URL}
"""


def report_error(exc: AlignkitError) -> None:
    """One unwrapped line naming the problem; a failing plugin's traceback comes first."""
    if isinstance(exc, HookError):
        traceback.print_exception(exc.cause, file=sys.stderr)
    print(f"alignkit: error: {exc}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    """Per-file loading bars from transformers would drown the run's own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # An HTTP judge makes one request per verdict; their INFO lines would fill the job log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _plugins_command() -> int:
    from rich.table import Table

    from alignkit.plugins import describe, import_failure_message

    try:
        manager, registry = registration()
    except AlignkitError as exc:  # e.g. two plugins registering one name: say which
        print(f"alignkit: error: {exc}", file=sys.stderr)
        return 1
    installed = manager.installed
    table = Table(title="alignkit plugins")
    for col in ("name", "source", "target", "hooks"):
        table.add_column(col, overflow="fold")
    for row in describe(installed):
        table.add_row(row["name"], row["source"], row["target"], row["hooks"])
    # What the plugins registered: advantage estimators, policy losses, rollout engines, ...
    components = Table(title="registered components")
    for col in ("kind", "names (plugin)"):
        components.add_column(col, overflow="fold")
    for kind in registry.kinds():
        names = ", ".join(f"{n} ({registry.owner(kind, n)})" for n in registry.names(kind))
        components.add_row(kind, names)
    from rich.console import Console

    Console(width=160).print(table)
    Console(width=160).print(components)
    broken = [info for info in installed.values() if not info.ok]
    for info in broken:
        print(f"\n{import_failure_message(info)}", file=sys.stderr)
    # Non-zero when a plugin is broken, so a CI check of the environment fails loudly.
    return 1 if broken else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alignkit`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["plugins"]:
        return _plugins_command()
    if args[:1] == ["compare"]:
        from alignkit.cli.compare import main as compare_main

        return compare_main(args[1:])
    if args[:1] == ["export"]:
        from alignkit.cli.export import main as export_main

        return export_main(args[1:])
    if args[:1] == ["label"]:
        from alignkit.label.cli import main as label_main

        return label_main(args[1:])
    if "--version" in args or "-V" in args:
        print(f"alignkit {version()}")
        return 0
    try:
        check_secret_overrides(args)
        manager, registry = registration()
    except AlignkitError as exc:
        report_error(exc)
        return 2
    if "--help" in args or "-h" in args:
        print(help_text(registry), end="")
        return 0
    _quiet_libraries()
    sys.argv = [sys.argv[0] if sys.argv else "alignkit", *args]
    try:
        _hydra_main(manager, registry, "config")()
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else 1
    except Exception:  # Hydra re-raises only outside its own error reporting
        traceback.print_exc()
        return 1
    return 0
