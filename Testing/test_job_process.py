"""The job process without Qt: `JobProcess` drives a fake backend that runs the real worker in this process (or
simulates a process that fails to start, crashes, or outlives its owner)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.engine.options import RegistrationOptions
from DeepRegistrationLib.frontends import worker
from DeepRegistrationLib.frontends.job import RegistrationJob
from DeepRegistrationLib.frontends.job_process import WORKER_MODULE, JobOutcome, JobProcess
from DeepRegistrationLib.methods import models, registry

from conftest import ellipsoid_labels, phantom_image


class InProcessBackend:
    """Starts nothing: `run()` executes the worker's `main` on the job folder, feeding its standard output to the
    `JobProcess` in two chunks (as a pipe may) and then its exit code, as QProcess's signals would."""

    def __init__(self, before_run=None) -> None:
        self.started, self.killed, self.before_run = None, 0, before_run

    def start(self, program, arguments, working_directory) -> None:
        self.started = (program, arguments, working_directory)

    def kill(self) -> None:
        self.killed += 1

    def run(self, process: JobProcess) -> None:
        assert self.started[1][:2] == ["-m", WORKER_MODULE]
        if self.before_run:
            self.before_run(process)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = worker.main([self.started[1][2]])
        text = out.getvalue()
        process.output(text[: len(text) // 2])
        process.output(text[len(text) // 2:] + "not json\n")
        process.exited(code)


@pytest.fixture(scope="module")
def pair_job(tmp_path_factory) -> RegistrationJob:
    shape = (24, 24, 24)
    grid = Grid.from_spacing(shape, (2.0, 2.0, 2.0), (-23.0, -23.0, -23.0))
    image = phantom_image(ellipsoid_labels(shape))[0, 0].numpy()
    spec = registry.get_method("lapirn")
    torch.manual_seed(0)
    net = spec.build(spec.config_class(start_channels=2, num_res_blocks=1, working_spacing=3.0))
    weights = models.save_model(net, "lapirn", tmp_path_factory.mktemp("w") / "tiny.safetensors")
    shifted = np.roll(image, 1, axis=0)
    return RegistrationJob(Image(image, grid, "fixed"), Image(shifted, grid, "moving"),
                           RegistrationOptions(method="lapirn", preset="fast", weights=str(weights),
                                               device="cpu"))


def start(job: RegistrationJob, backend, tmp_path: Path):
    events = {"progress": [], "log": [], "finished": []}
    process = JobProcess(job, backend, "python", tmp_path, progress=lambda s, f: events["progress"].append((s, f)),
                         log=events["log"].append, finished=events["finished"].append,
                         temporary_dir=str(tmp_path))
    process.start()
    return process, events


def test_a_run_reports_progress_then_one_done_with_the_result(pair_job, tmp_path):
    backend = InProcessBackend()
    process, events = start(pair_job, backend, tmp_path)
    assert process.running and process.folder.is_dir()
    backend.run(process)
    [outcome] = events["finished"]
    assert outcome.status == "done" and outcome.result.metrics.run.method == "lapirn"
    assert outcome.result.field.grid.same_as(pair_job.fixed.grid)
    assert [stage for stage, _ in events["progress"]][:2] == ["preprocessing", "network"]
    assert "not json" in events["log"]
    assert not process.running and not process.folder.exists()
    process.exited(0)  # a second end (QProcess's errorOccurred after finished) is ignored
    assert len(events["finished"]) == 1


def test_cancel_before_the_worker_looks_ends_cancelled(pair_job, tmp_path):
    backend = InProcessBackend(before_run=lambda p: p.cancel())
    process, events = start(pair_job, backend, tmp_path)
    backend.run(process)
    assert [o.status for o in events["finished"]] == ["cancelled"]
    process.kill_if_running()
    assert backend.killed == 0, "a finished worker is not killed"


def test_bad_input_ends_failed_with_the_workers_message(pair_job, tmp_path):
    bad = RegistrationJob(pair_job.fixed, pair_job.moving,
                          RegistrationOptions(method="lapirn", preset="fast",
                                              weights=str(tmp_path / "missing.safetensors")))
    backend = InProcessBackend()
    process, events = start(bad, backend, tmp_path)
    backend.run(process)
    [outcome] = events["finished"]
    assert outcome.status == "failed" and outcome.error_type == "InputError"
    assert "missing.safetensors" in outcome.message


def test_a_worker_that_cannot_start_or_crashes_ends_failed(pair_job, tmp_path):
    process, events = start(pair_job, InProcessBackend(), tmp_path)
    process.failed_to_start("No such file or directory")
    process, more = start(pair_job, InProcessBackend(), tmp_path)
    process.exited(-1, crashed=True)
    outcomes = events["finished"] + more["finished"]
    assert [o.status for o in outcomes] == ["failed", "failed"]
    assert "could not be started" in outcomes[0].message and "crashed" in outcomes[1].message
    assert not list(tmp_path.glob("DeepRegistration-*")), "job folders are removed"


def test_an_owner_that_goes_away_kills_the_worker_and_gets_abandoned(pair_job, tmp_path):
    backend = InProcessBackend()
    process, events = start(pair_job, backend, tmp_path)
    process.abandon()
    assert backend.killed == 1 and (process.folder / "cancel").exists()
    process.exited(9, crashed=True)
    assert events["finished"] == [JobOutcome("abandoned")]
