"""One clear line, no traceback (issue 22, case 14): a YAML error, a full disk during a save, a read-only run
directory, the checkpoint library's errors; the traceback only with --debug. Exit code 2 for what the user
must fix, 1 for what happened to the run."""
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from trainer.cli import describe_error, main
from trainer.config.catalog import REPO_ROOT
from trainer.config.recipes import load_config
from trainer.engine.checkpoint import list_complete, verify_checkpoint
from trainer.engine.preemption import StopRequest
from trainer.tasks.training import train


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("rectok: error:")]


@pytest.mark.quick
def test_yaml_syntax_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [RecTok-BB\n")
    assert main(["train", str(bad)]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "not valid YAML at line" in err[0] and str(bad) in err[0]
    from trainer.config.tree import ConfigError
    with pytest.raises(ConfigError):
        main(["train", str(bad), "--debug"])


@pytest.mark.quick
def test_checkpoint_library_errors_are_unwrapped():
    from torch.distributed.checkpoint.api import CheckpointException
    e = CheckpointException("load", {0: (OSError(28, "No space left on device", "/run/x.distcp"), None)})
    message, code = describe_error(e)
    assert code == 1 and message == "checkpoint files: cannot write /run/x.distcp: No space left on device (disk " \
                                    "full or quota reached)"
    assert describe_error(ValueError("odd\nsecond line"))[0] == "ValueError: odd (rerun with --debug for the traceback)"


@pytest.mark.quick
def test_a_second_ctrl_c_interrupts_at_once():
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == "SIGINT" and not stop.requeue
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()


def _rectok(args, preexec=None, wrap=()):
    return subprocess.run([*wrap, sys.executable, "-m", "trainer.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, preexec_fn=preexec, timeout=300)


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_stays(micro):
    """The file-size limit stands in for a full disk: the writes fail with an OSError as they would."""
    over = [*micro, "run.name=full", "checkpoint.every_steps=1", "eval.every_epochs=0"]
    train(load_config("rectok/tiny_stage1", over + ["run.max_steps=1"]))

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    done = _rectok(["train", "rectok/tiny_stage1", *over, "run.max_steps=2"], preexec=small_files)
    assert done.returncode == 1, done.stderr
    err = _errors(done.stderr)
    assert len(err) == 1 and "disk full or quota reached" in err[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    run = os.path.join(micro[0].split("=", 1)[1], "full")
    (step, path), = list_complete(run)
    assert step == 1 and verify_checkpoint(path) is None


def test_a_read_only_run_directory_is_one_line(micro, tmp_path):
    out = tmp_path / "readonly"
    out.mkdir()
    args = ["train", "rectok/tiny_stage1", *micro, f"run.output_dir={out}", "run.max_steps=1"]
    if os.geteuid() != 0:
        out.chmod(0o555)
        done = _rectok(args)
    elif shutil.which("unshare"):  # root writes anywhere: a read-only bind mount in a private mount namespace
        script = f'mount --bind "{out}" "{out}" && mount -o remount,bind,ro "{out}" && exec "$@"'
        done = _rectok(args, wrap=("unshare", "-m", "sh", "-c", script, "sh"))
        if "mount:" in done.stderr:
            pytest.skip(f"no read-only mount here: {done.stderr.strip()[:200]}")
    else:
        pytest.skip("running as root without unshare: no directory is read-only")
    assert done.returncode == 2, done.stderr
    err = _errors(done.stderr)
    assert len(err) == 1 and f"cannot write {out}" in err[0] and "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.quick
def test_every_command_help_has_an_example():
    """Issue 27: `rectok COMMAND [SUBCOMMAND] --help` of every command and subcommand ends with examples."""
    import argparse

    from trainer.cli import build_parser

    def leaves(parser, name):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield name, parser
        for action in subs:
            for sub_name, sub in action.choices.items():
                yield from leaves(sub, f"{name} {sub_name}")

    found = dict(leaves(build_parser(), "rectok"))
    assert {"rectok train", "rectok data write-ffcv", "rectok eval probe", "rectok demo"} <= set(found)
    missing = [name for name, parser in found.items() if "example" not in parser.format_help()]
    assert not missing, f"--help without an example: {missing}"
