"""The Optuna sweeper without training: Hydra's override grammar to Optuna distributions, and the sweep loop
(budget, resume, failures, pruned trials, grid) run against a launcher that evaluates a function."""

from __future__ import annotations

import math
import subprocess
import sys

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from lf_common.errors import ConfigError
from trainer.cli.hydra_app import conf_folder
from trainer.sweeps.optuna_sweeper import ResumableOptunaSweeperImpl
from trainer.sweeps.search_space import grid_choices, parse_search_space
from trainer.sweeps.trial import TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_each_sweep_of_the_grammar_maps_to_its_distribution():
    space = parse_search_space(
        {"lr": "tag(log, interval(1e-5, 1e-2))", "wd": "interval(0, 0.1)", "steps": "int(interval(4, 16))"},
        [
            "bs=choice(8,16)", "+opt=adam,sgd", "k=range(1,9,step=2)", "f=range(0.0,1.0,step=0.25)",
            "s=shuffle(range(1,4))", "n=tag(log, int(interval(1, 64)))",
        ],
    )  # fmt: skip
    assert space.distributions == {
        "lr": FloatDistribution(1e-5, 1e-2, log=True),
        "wd": FloatDistribution(0.0, 0.1),
        "steps": IntDistribution(4, 16),
        "bs": CategoricalDistribution([8, 16]),
        "+opt": CategoricalDistribution(["adam", "sgd"]),
        "k": IntDistribution(1, 9, step=2),
        "f": FloatDistribution(0.0, 1.0, step=0.25),
        "s": CategoricalDistribution([1, 2, 3]),  # shuffled: sorted, so that a resumed study sees the same choices
        "n": IntDistribution(1, 64, log=True),
    }
    assert space.fixed == {}
    lists = parse_search_space(None, ["x=choice([1,2],[3])", "y=null,1,a"])
    assert lists.distributions == {
        "x": CategoricalDistribution(["[1,2]", "[3]"]),
        "y": CategoricalDistribution(["null", 1, "a"]),
    }
    assert lists.overrides({"x": "[1,2]", "y": "null"}) == ["x=[1,2]", "y=null"], "parsed back as a list and null"


def test_fixed_values_pass_as_written_and_the_last_mention_of_a_key_wins():
    space = parse_search_space(
        {"optim.lr": "interval(0.1, 1)", "optim.weight_decay": "interval(0, 0.1)", "seed": 3},
        ["optim.weight_decay=0.0", "seed=choice(1,2)", "~callbacks.progress", "data.train_dir='/a b/c'"],
    )
    assert set(space.distributions) == {"optim.lr", "seed"}, "a fixed value takes a key out; a sweep puts it in"
    assert space.fixed == {
        "optim.weight_decay": "optim.weight_decay=0.0",
        "~callbacks.progress": "~callbacks.progress",
        "data.train_dir": "data.train_dir='/a b/c'",
    }
    assert space.overrides({"optim.lr": 0.5, "seed": 2}) == [
        "optim.lr=0.5", "seed=2", "optim.weight_decay=0.0", "~callbacks.progress", "data.train_dir='/a b/c'",
    ]  # fmt: skip


def test_sweeps_optuna_cannot_sample_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"model=glob\(\*\): the Optuna sweeper samples choice"):
        parse_search_space(None, ["model=glob(*)"])
    with pytest.raises(ConfigError, match="lr: the grid sampler"):
        grid_choices(parse_search_space(None, ["lr=interval(0, 1)"]).distributions)


def test_grid_choices_are_every_value_the_distribution_gives():
    space = parse_search_space(None, ["a=x,y", "k=range(1,9,step=2)", "f=range(0.0,1.0,step=0.25)"])
    assert grid_choices(space.distributions) == {
        "a": ["x", "y"],
        "k": [1, 3, 5, 7, 9],
        "f": [0.0, 0.25, 0.5, 0.75, 1.0],
    }


class FunctionLauncher:
    """A Hydra launcher that runs each job as ``objective(params)`` in this process and records what it was given.

    ``objective`` returns the job's value, raises (a crashed job), or returns ``"pruned"`` (the job wrote a
    ``trial.json`` with status pruned into its folder, as a pruned ``lf-train`` trial does).
    """

    def __init__(self, objective, tmp_path) -> None:
        self.objective = objective
        self.tmp_path = tmp_path
        self.batches: list[tuple[int, list[list[str]]]] = []

    def launch(self, job_overrides, initial_job_idx):
        self.batches.append((initial_job_idx, [list(o) for o in job_overrides]))
        returns = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            params = dict(o.lstrip("+").split("=", 1) for o in overrides)
            folder = self.tmp_path / "jobs" / str(idx)
            folder.mkdir(parents=True)
            ret = JobReturn(
                overrides=overrides, hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(folder)}}})
            )
            try:
                value = self.objective(params)
            except Exception as error:
                ret.status, ret.return_value = JobStatus.FAILED, error
            else:
                if value == "pruned":
                    TrialRecord(idx, list(overrides), "val/loss", "minimize", None, "pruned").write(folder)
                    value = float("nan")
                ret.status, ret.return_value = JobStatus.COMPLETED, value
            returns.append(ret)
        return returns


def make_sweeper(tmp_path, objective, **settings) -> tuple[ResumableOptunaSweeperImpl, FunctionLauncher]:
    settings = {"storage": f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}", "study_name": "s", **settings}
    sweeper = ResumableOptunaSweeperImpl(**settings)
    launcher = FunctionLauncher(objective, tmp_path)
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    sweeper.launcher = launcher
    return sweeper, launcher


def quadratic(params: dict) -> float:
    return (math.log10(float(params["optim.lr"])) + 3) ** 2 + int(params["data.batch_size"]) / 100


def test_a_sweep_runs_its_budget_in_batches_then_a_restart_runs_only_the_missing_trials(tmp_path):
    params = {"optim.lr": "tag(log, interval(1e-5, 1e-1))", "data.batch_size": "choice(8, 16)"}
    sweeper, launcher = make_sweeper(
        tmp_path, quadratic, sampler=optuna.samplers.RandomSampler(seed=0), n_trials=5, n_jobs=2, params=params
    )
    sweeper.sweep(["data.batch_size=8,16,32", "optim.weight_decay=0.0"])
    assert [(start, len(batch)) for start, batch in launcher.batches] == [(0, 2), (2, 2), (4, 1)]
    jobs = [overrides for _, batch in launcher.batches for overrides in batch]
    for number, overrides in enumerate(jobs):
        assert overrides[-2:] == ["optim.weight_decay=0.0", f"++optuna_trial_number={number}"]
        values = dict(o.split("=", 1) for o in overrides[:2])
        assert 1e-5 <= float(values["optim.lr"]) <= 1e-1 and values["data.batch_size"] in {"8", "16", "32"}

    study = optuna.load_study(study_name="s", storage=sweeper.storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    assert study.trials[0].user_attrs["optim.weight_decay"] == "0.0"
    results = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert results.best_trial == study.best_trial.number and results.best_value == pytest.approx(study.best_value)

    again, relaunched = make_sweeper(tmp_path, quadratic, n_trials=7, n_jobs=4, params=params)
    again.sweep(["data.batch_size=8,16,32", "optim.weight_decay=0.0"])
    assert [(start, len(batch)) for start, batch in relaunched.batches] == [(5, 2)], "job numbers go on"
    assert len(optuna.load_study(study_name="s", storage=sweeper.storage).trials) == 7

    other_choices, _ = make_sweeper(tmp_path, quadratic, n_trials=8, params=params)
    with pytest.raises(ConfigError, match=r"trials sampled data\.batch_size from CategoricalDistribution"):
        other_choices.sweep([])  # the params' choice(8, 16), not the command line's 8,16,32
    assert len(optuna.load_study(study_name="s", storage=sweeper.storage).trials) == 7, "no trial left behind"


def test_recorded_failures_and_pruned_trials_are_told_and_the_sweep_goes_on(tmp_path):
    outcomes = iter([float("nan"), "pruned", 0.5])
    sweeper, _ = make_sweeper(tmp_path, lambda params: next(outcomes), n_trials=3, params={"x": "interval(0, 1)"})
    sweeper.sweep([])
    study = optuna.load_study(study_name="s", storage=sweeper.storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE]
    assert OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml").best_trial == 2


def test_a_crashed_job_stops_the_sweep_with_its_own_error_unless_the_failure_rate_allows(tmp_path):
    def crash(params: dict) -> float:
        raise FileNotFoundError("data.train_dir=missing does not exist")

    sweeper, _ = make_sweeper(tmp_path, crash, n_trials=3, params={"x": "interval(0, 1)"})
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        sweeper.sweep([])
    study = optuna.load_study(study_name="s", storage=sweeper.storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL]

    tolerant, launcher = make_sweeper(
        tmp_path / "tolerant", crash, n_trials=2, params={"x": "interval(0, 1)"}, max_failure_rate=1.0
    )
    tolerant.sweep([])
    assert len(launcher.batches) == 2, "crashed trials count toward the budget; the sweep ended by itself"


def test_the_grid_sampler_tries_each_combination_once_and_caps_the_budget(tmp_path):
    grid = instantiate(OmegaConf.load(conf_folder() / "hydra" / "sweeper" / "sampler" / "grid.yaml"))  # a partial
    sweeper, launcher = make_sweeper(tmp_path, lambda params: float(params["k"]), sampler=grid, n_trials=100)
    sweeper.sweep(["a=x,y", "k=range(1,5,step=2)"])
    tried = sorted((dict(o.split("=", 1) for o in batch[0][:2])["a"], batch[0][1]) for _, batch in launcher.batches)
    assert tried == [("x", "k=1"), ("x", "k=3"), ("x", "k=5"), ("y", "k=1"), ("y", "k=3"), ("y", "k=5")]
    study = optuna.load_study(study_name="s", storage=sweeper.storage)
    assert len(study.trials) == 6 and {t.state for t in study.trials} == {TrialState.COMPLETE}


def test_more_than_one_objective_or_a_bad_failure_rate_is_refused():
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.direction"):
        ResumableOptunaSweeperImpl(direction=["minimize", "maximize"])
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.direction"):
        ResumableOptunaSweeperImpl(direction="lowest")
    with pytest.raises(ConfigError, match=r"max_failure_rate must be within \[0, 1\], got 2"):
        ResumableOptunaSweeperImpl(max_failure_rate=2)


def add_depth(config, trial: optuna.Trial) -> None:
    """A custom search space: a parameter that depends on another."""
    if trial.params["model"] == "deep":
        trial.suggest_int("model.depth", 4, 8)


def test_a_custom_search_space_adds_its_parameters_to_the_trial(tmp_path):
    sweeper, launcher = make_sweeper(
        tmp_path, lambda params: 0.0, n_trials=4, custom_search_space=f"{__name__}.add_depth",
        sampler=optuna.samplers.RandomSampler(seed=1),
    )  # fmt: skip
    sweeper.sweep(["model=deep,shallow"])
    jobs = [dict(o.split("=", 1) for o in overrides[:-1]) for _, batch in launcher.batches for overrides in batch]
    assert all(("model.depth" in job) == (job["model"] == "deep") for job in jobs) and len(jobs) == 4


def test_the_plugin_builds_from_the_optuna_sweeper_config_and_imports_no_optuna_until_then():
    from hydra import compose, initialize_config_module

    from trainer.cli.hydra_app import CONF_MODULE

    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        cfg = compose("train", ["hparams_search=lr_optuna", "data.train_dir=x"], return_hydra_config=True)
        sweeper = instantiate(cfg.hydra.sweeper)
    assert isinstance(sweeper, Sweeper) and isinstance(sweeper.sweeper.sampler, optuna.samplers.TPESampler)
    assert sweeper.sweeper.n_trials == 20 and sweeper.sweeper.direction == "minimize"
    plugin = "hydra_plugins.latentforge_sweepers.resumable_optuna"
    check = f"import sys, {plugin}; print(sorted({{'optuna', 'torch'}} & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]", "Hydra imports the plugin module at every start: it must stay light"
