"""Every launcher dry-runs: it prints the command it would run, with the settings in place."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from trainer.cli.hydra_app import CONF_MODULE, VERSION_BASE

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    result = subprocess.run(
        ["bash", str(LAUNCH / script), "--dry-run", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return shlex.split(result.stdout)


RESTARTS = {"--max-restarts=3", "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "auto_resume=true"}


def test_torchrun_single_node_restarts_and_resumes_in_one_run_folder():
    command = dry_run("torchrun_single_node.sh", "4", "strategy=ddp", RUN_DIR="outputs/train/mine")
    assert command[:3] == ["torchrun", "--standalone", "--nproc_per_node=4"]
    assert command[-1] == "strategy=ddp" and {"trainer.accelerator=gpu", "trainer.devices=4"} <= set(command)
    assert RESTARTS | {"hydra.run.dir=outputs/train/mine"} <= set(command)
    fresh = dry_run("torchrun_single_node.sh", "4")
    assert any(c.startswith("hydra.run.dir=outputs/train/torchrun-") for c in fresh), "a new run gets a new folder"


def test_torchrun_multi_node_static_and_c10d_rendezvous():
    static = dry_run("torchrun_multi_node.sh", "2", "8", "seed=1", MASTER_ADDR="node0", NODE_RANK="1", RUN_DIR="r")
    assert {"--nnodes=2", "--nproc_per_node=8", "--node_rank=1", "--master_addr=node0", "--master_port=29500"} <= set(
        static
    )
    assert static[-1] == "seed=1" and RESTARTS | {"trainer.num_nodes=2", "hydra.run.dir=r"} <= set(static)
    elastic = dry_run("torchrun_multi_node.sh", "2", "8", RDZV_ENDPOINT="node0:29400", RDZV_ID="job7", RUN_DIR="r")
    assert {"--rdzv_backend=c10d", "--rdzv_endpoint=node0:29400", "--rdzv_id=job7"} <= set(elastic)


def test_slurm_sbatch_asks_for_the_signal_and_resumes_in_the_jobs_folder():
    command = dry_run(
        "slurm.sbatch", "strategy=deepspeed_stage_2", SLURM_NTASKS_PER_NODE="4", SLURM_NNODES="3", SLURM_JOB_ID="77"
    )
    assert command[:2] == ["srun", "lf-train"]
    assert {"trainer.devices=4", "trainer.num_nodes=3", "strategy=deepspeed_stage_2"} <= set(command)
    assert {"hydra.run.dir=outputs/train/slurm-77", "auto_resume=true"} <= set(command), "a requeued job resumes"
    script = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=USR1@120" in script and "#SBATCH --requeue" in script
    assert "if [[ $status -eq 75 ]]" in script and 'scontrol requeue "$job"' in script


def test_deepspeed_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnodeA slots=8\n\nnodeB slots=8\n")
    command = dry_run("deepspeed_hostfile.sh", str(hostfile), "8", "strategy=deepspeed_stage_3", RUN_DIR="r")
    assert command[0] == "deepspeed"
    assert {"hydra.run.dir=r", "auto_resume=true"} <= set(command)
    assert {f"--hostfile={hostfile}", "--num_nodes=2", "--num_gpus=8", "--master_addr=nodeA"} <= set(command)
    assert {"--no_python", "--no_local_rank", "trainer.num_nodes=2", "strategy=deepspeed_stage_3"} <= set(command)
    shim = Path(command[command.index("--no_local_rank") + 1])
    out = subprocess.run(
        [str(shim), "bash", "-c", "echo $NODE_RANK"],
        env={**os.environ, "CROSS_RANK": "1"},
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "1", "the node rank reaches Lightning as NODE_RANK"


def test_hydra_submitit_launcher_config():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_module(CONF_MODULE, version_base=VERSION_BASE):
        cfg = compose(
            "train",
            ["hydra/launcher=slurm_gpus", "hydra.launcher.nodes=2", "data.train_dir=x", "output_dir=o"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)


@pytest.mark.parametrize("status", [75, 0, 1])
def test_slurm_sbatch_requeues_a_preempted_job_only(tmp_path, status):
    """With stand-ins for srun (exits ``status``) and scontrol (records its arguments)."""
    (tmp_path / "srun").write_text(f"#!/bin/sh\nexit {status}\n")
    (tmp_path / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    for tool in ("srun", "scontrol"):
        (tmp_path / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "77"}
    result = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), "seed=1"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == status
    requeued = (tmp_path / "scontrol.args").read_text().split() if (tmp_path / "scontrol.args").exists() else []
    assert requeued == (["requeue", "77"] if status == 75 else [])
