"""Running stock nnU-Net (and nnunetv2_dsm) commands in subprocesses from tests."""

import subprocess
import textwrap
from pathlib import Path


def run_command(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output tail when it exits non-zero."""
    if "nnUNetv2_plan" in args[0]:
        # nnU-Net's planner passes this value to torch.set_num_threads, which rejects 0.
        env = {**env, "nnUNet_n_proc_DA": "2"}
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def failed_save_script(dataset_id: str, configuration: str, trainer: str, plans: str, target: Path) -> str:
    """Python source in which ``trainer`` saves ``target``, then a save that dies half-way (a full disk) must
    raise, leave the first checkpoint byte for byte and no temporary beside it. Leaves ``trainer`` and
    ``before`` (the first checkpoint's bytes) defined for checks appended by the test."""
    return textwrap.dedent(f"""
        import os, torch
        from nnunetv2.run.run_training import get_trainer_from_args
        trainer = get_trainer_from_args('{dataset_id}', '{configuration}', 0, '{trainer}', '{plans}',
                                        device=torch.device('cpu'))
        trainer.initialize()
        trainer.save_checkpoint({str(target)!r})
        before = open({str(target)!r}, 'rb').read()

        def crash(obj, f, *args, **kwargs):
            with open(f, 'wb') as handle:
                handle.write(b'partial')
            raise OSError('disk full')

        real_save, torch.save = torch.save, crash
        try:
            trainer.save_checkpoint({str(target)!r})
        except OSError as err:
            assert 'disk full' in str(err)
        else:
            raise AssertionError('the failed save must raise')
        torch.save = real_save
        assert open({str(target)!r}, 'rb').read() == before, 'previous checkpoint changed'
        assert sorted(os.listdir({str(target.parent)!r})) == [{target.name!r}], os.listdir({str(target.parent)!r})
    """)
