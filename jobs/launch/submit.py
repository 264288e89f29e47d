"""`privlm train submit`: the job `privlm train run` runs, submitted through submitit to Slurm or this machine.

Each Slurm task is one rank. It reads RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address from
submitit's `JobEnvironment`, then runs the trainer in-process. The trainer owns the stop signals while it
runs; when it returns, its exit code (jobs/launch/preemption.py) decides what happens to the job:

    0                    done: the result (final step, loss, model directory) is the job's result
    128+SIGUSR2          preempted, timed out (Slurm's --signal) or a spot notice: the checkpoint is written,
                         so rank 0 hands over to submitit, which requeues the job (`scontrol requeue`) and
                         exits; the next run resumes from that checkpoint
    128+SIGTERM          `scontrol requeue` or `scancel`: the checkpoint is written; Slurm decides the rest
"""

from __future__ import annotations

import os
import signal
import time
import zlib
from pathlib import Path
from typing import Any

import submitit

from jobs.launch.preemption import REQUEUE, REQUEUE_SIGNAL, StopRequest, stopped_code
from jobs.launch.slurm import (
    SubmitError,
    check_fits,
    choose_partition,
    gpus_per_node,
    node_address,
    partitions,
    sbatch_options,
)
from jobs.recipe import Recipe, load_recipe
from jobs.run_dir import RunDir


def rendezvous_port(job_id: str) -> int:
    """The same port on every task of a job, different for concurrent jobs (29500-39499)."""
    return 29500 + zlib.crc32(job_id.encode()) % 10000


def rank_environment(env: Any) -> dict[str, str]:
    """torch.distributed's variables from a submitit JobEnvironment (Slurm or local)."""
    local_world = max(1, env.num_tasks // max(1, env.num_nodes))
    master = "127.0.0.1" if env.cluster == "local" else node_address(env.hostnames[0])
    return {"RANK": str(env.global_rank), "LOCAL_RANK": str(env.local_rank), "WORLD_SIZE": str(env.num_tasks),
            "LOCAL_WORLD_SIZE": str(local_world), "NODE_RANK": str(env.node), "MASTER_ADDR": master,
            "MASTER_PORT": str(rendezvous_port(env.job_id.split("_")[0]))}


class TrainJob(submitit.helpers.Checkpointable):
    """One training run as a submitit job; `checkpoint()` (inherited) resubmits it unchanged, and the
    trainer's own checkpoints carry the state."""

    def __init__(self, recipe_file: str, workdir: str) -> None:
        self.recipe_file = recipe_file
        self.workdir = workdir

    def __call__(self) -> dict[str, Any]:
        os.chdir(self.workdir)
        env = submitit.JobEnvironment()
        recipe = recipe_for_allocation(self.recipe_file, env.num_nodes, env.num_tasks)
        os.environ.update(rank_environment(env))
        print(f"[privlm] {env}: rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
        submitit_handlers = StopRequest.current()
        from jobs.train.engine import train

        code = train(recipe)
        StopRequest.restore(submitit_handlers)
        if code == 0:
            return result_of(recipe)
        if code == REQUEUE:
            self._requeue(env, submitit_handlers[REQUEUE_SIGNAL])
        if code == stopped_code(signal.SIGTERM):
            # submitit's _interrupt() and Slurm send TERM, then the preemption signal: give it a moment
            time.sleep(3)
            raise SystemExit(code)
        raise RuntimeError(f"training exited with code {code}; the log above says why")

    @staticmethod
    def _requeue(env: Any, handler: Any) -> None:
        """Rank 0: submitit requeues the job and exits. Other ranks wait to be stopped with it."""
        print(f"[privlm] rank {env.global_rank}: checkpoint written; requeueing", flush=True)
        if env.global_rank == 0 and callable(handler):
            handler(REQUEUE_SIGNAL, None)  # scontrol requeue (Slurm) or a restart code (local), then sys.exit
        if env.cluster != "local":
            time.sleep(60)  # the requeue stops this task; if it does not, leave without a result
        os._exit(0)


def recipe_for_allocation(recipe_file: str, nodes: int, tasks: int) -> Recipe:
    """The recipe, resized to the ranks Slurm actually gave this run (a requeue onto fewer nodes): the trainer
    then resumes its checkpoint on the new data-parallel degree with the same global batch and data position.
    A size the recipe's batch or tensor/pipeline layout cannot split is refused, naming both sizes."""
    from jobs.recipe import RecipeError

    recipe = load_recipe(recipe_file)
    if tasks == recipe.training.world_size:
        return recipe
    per_node = max(1, tasks // max(1, nodes))
    try:
        resized = load_recipe(recipe_file, [f"training.nodes={nodes}", f"training.processes_per_node={per_node}"])
    except RecipeError as exc:
        raise SubmitError(f"the job got {tasks} tasks on {nodes} node(s) but the recipe wants "
                          f"{recipe.training.world_size}, and cannot run on {tasks}: {exc}") from None
    print(f"[privlm] running on {tasks} ranks ({nodes} x {per_node}) instead of the recipe's "
          f"{recipe.training.world_size}: the checkpoint is resumed on the new world size", flush=True)
    return resized


def result_of(recipe: Recipe) -> dict[str, Any]:
    """What a finished job returns: final step, last logged loss, held-out loss of the exported model, resumes,
    and the number of ranks (tasks) of the run that finished it (fewer than submitted after a shrink)."""
    run = RunDir.of(recipe)
    step, loss, resumes = run.progress()
    eval_loss = (run.summary() or {}).get("eval_loss")
    return {"name": recipe.name, "step": step, "loss": loss, "eval_loss": eval_loss, "resumes": resumes,
            "model_dir": str(run.model_dir.resolve()), "world_size": recipe.training.world_size}


def job_results(job: Any) -> list[dict[str, Any]]:
    """Every task's result of a finished job. submitit waits for as many tasks as were submitted; a job
    requeued onto fewer nodes (slurm.min_nodes) finishes with fewer, so rank 0's result says how many
    tasks the last run had and only those are read."""
    if job.num_tasks == 1:
        return job.results()
    first = job.task(0).result()
    tasks = min(job.num_tasks, int(first.get("world_size", job.num_tasks)))
    return [first, *(job.task(i).result() for i in range(1, tasks))]


def executor_for(recipe: Recipe, kind: str, folder: Path) -> submitit.Executor:
    """A submitit executor with the recipe's resources; Slurm's are checked against `sinfo` first."""
    t, s = recipe.training, recipe.slurm
    cpus = s.cpus_per_task or t.threads_per_process or 1
    params: dict[str, Any] = {"timeout_min": s.time_limit_min, "nodes": t.nodes, "tasks_per_node": t.processes_per_node,
                              "cpus_per_task": cpus, "name": f"privlm-{recipe.name}", "stderr_to_stdout": True}
    if s.min_nodes is not None and s.min_nodes < t.nodes:
        # with --ntasks-per-node, Slurm sizes a node range by its minimum (measured, 22.05): leave it out so
        # the job gets as many nodes as are free; srun then starts one task (rank) per node
        del params["tasks_per_node"]
    if kind == "local":
        if t.nodes > 1:
            raise SubmitError(f"training.nodes={t.nodes}: the local executor runs on this machine only; "
                              "use --executor slurm or set training.nodes=1")
        local = submitit.LocalExecutor(folder=folder)
        local.update_parameters(timeout_min=s.time_limit_min, tasks_per_node=t.processes_per_node,
                                signal_delay_s=s.signal_delay_s, stderr_to_stdout=True)
        return local
    partition = choose_partition(recipe, partitions())
    problems = check_fits(recipe, partition)
    if problems:
        raise SubmitError("refused before submission:\n  - " + "\n  - ".join(problems))
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=s.max_requeues)
    executor.update_parameters(**params, slurm_partition=partition.name, slurm_signal_delay_s=s.signal_delay_s,
                               slurm_additional_parameters=sbatch_options(recipe), slurm_setup=list(s.setup),
                               gpus_per_node=gpus_per_node(recipe, partition),
                               **({"mem_gb": s.mem_gb} if s.mem_gb else {}))
    return executor


def default_executor() -> str:
    """Slurm when a cluster answers here, else this machine."""
    from jobs.launch.slurm import slurm_available

    return "slurm" if slurm_available() else "local"


def check_data(recipe: Recipe) -> None:
    """Refuse a job whose data is not prepared (it would fail on every node after waiting in the queue)."""
    if not (recipe.data_path / "index.json").is_file():
        raise SubmitError(f"data.output_dir={str(recipe.data_path)!r} has no prepared data; run "
                          f"`privlm data prepare` (or `privlm data submit`) with this recipe first")


def submit_training(recipe: Recipe, kind: str | None = None) -> Any:
    """Write the resolved recipe, submit the job, record it for `privlm jobs`; return the submitit job."""
    from jobs.launch.records import record_job
    from jobs.train.launcher import write_resolved_recipe

    kind = kind or default_executor()
    check_data(recipe)
    folder = (recipe.run_path / "submitit").resolve()
    executor = executor_for(recipe, kind, folder)
    resolved = write_resolved_recipe(recipe).resolve()
    job = executor.submit(TrainJob(str(resolved), os.getcwd()))
    record_job(job, kind, "train", recipe, folder)
    return job


def follow(job: Any, recipe: Recipe, console: Any = None) -> list[dict[str, Any]]:
    """Wait for JOB with a progress bar fed by the run's metrics.jsonl; its results, or the log tail on failure."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    total = recipe.training.total_steps
    columns = (TextColumn(f"{recipe.name} job {job.job_id}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("train", total=total, status="queued")
        while not job.task(0).done():  # rank 0 always runs; other tasks may be gone after a shrink
            step, loss, resumes = RunDir.of(recipe).progress()
            status = (f"loss {loss:.3f}" if loss is not None else "starting") + (f", resumed x{resumes}"
                                                                                 if resumes else "")
            bar.update(task, completed=step, status=status)
            time.sleep(0.5)
        step, loss, _ = RunDir.of(recipe).progress()
        bar.update(task, completed=step, status=f"loss {loss:.3f}" if loss is not None else "")
    try:
        return job_results(job)
    except Exception:
        console.print(f"[red]job {job.job_id} failed; its log ends with:\n" + (job.stdout() or "")[-3000:])
        raise
